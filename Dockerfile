# sandbox-proxy image: built from Debian bookworm packages only (the lists .ci/run installs:
# the build part of .ci/packages, the lines above its `#:end-build` marker, to build; not its
# test tools; .ci/packages.runtime to run), running as non-root.
#   docker build -t sandbox-proxy .
#   docker run -p 8080:8080 sandbox-proxy            # local demo (no cluster)
# Without Docker or a registry: .ci/image (mmdebstrap bases, podman build, then checks the image).
# In Kubernetes (k8s/base/deployment.yaml) it finds the API server in-cluster. Built-in scripts
# are in /usr/local/share/sandbox-proxy/scripts; mount a ConfigMap at /etc/sandbox-proxy/scripts
# (the override directory) to replace any of them file by file.

FROM debian:bookworm AS build
COPY .ci/packages .ci/packages.runtime /tmp/
RUN apt-get update \
 && { sed '/^#:end-build/,$d' /tmp/packages; cat /tmp/packages.runtime; } \
    | sed 's/#.*//' | awk 'NF { print $1 }' \
    | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake ./cmake
COPY runtime ./runtime
COPY scripts ./scripts
COPY spec ./spec
RUN cmake -B build -DCMAKE_BUILD_TYPE=Release \
 && cmake --build build -j"$(nproc)" --target sandbox-proxy \
 && cmake --install build --prefix /opt/sandbox-proxy \
 && /opt/sandbox-proxy/bin/sandbox-proxy --check --demo

FROM debian:bookworm-slim
COPY .ci/packages.runtime /tmp/
RUN apt-get update \
 && sed 's/#.*//' /tmp/packages.runtime | awk 'NF { print $1 }' \
    | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.runtime \
 && groupadd --system --gid 10001 sandbox-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home sandbox-proxy \
 && mkdir -p /etc/sandbox-proxy/scripts
COPY --from=build /opt/sandbox-proxy /usr/local
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sandbox-proxy"]
CMD ["--listen", "0.0.0.0:8080", "--scripts", "/etc/sandbox-proxy/scripts"]
