/*
 * test_main.c: the C unit-test runner (ctest entry c-unit). Runs every module's suite
 * (spec/c/test_<module>.c), or only the ones named on the command line
 * (`test_core routes shdict`), and prints a summary; exits non-zero on any failure.
 */
#include "test.h"

int g_tests, g_checks, g_failures;

static const struct {
    const char *name;
    void (*run)(void);
} suites[] = {
    {"util", suite_util},     {"http", suite_http},     {"buf", suite_buf},
    {"json_scan", suite_json_scan}, {"routes", suite_routes}, {"shdict", suite_shdict},
    {"config", suite_config}, {"log", suite_log}, {"deadline", suite_deadline},
    {"fswatch", suite_fswatch},
};

int main(int argc, char **argv)
{
    int ran = 0;
    for (size_t i = 0; i < SP_ARRAY_LEN(suites); i++) {
        bool wanted = argc < 2;
        for (int a = 1; a < argc; a++)
            wanted |= strcmp(argv[a], suites[i].name) == 0;
        if (wanted) {
            suites[i].run();
            ran++;
        }
    }
    if (!ran) {
        fprintf(stderr, "no such suite\n");
        return 2;
    }
    printf("%d tests, %d checks, %d failures\n", g_tests, g_checks, g_failures);
    return g_failures ? 1 : 0;
}
