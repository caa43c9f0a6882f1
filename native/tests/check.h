/* A minimal check macro for the ctest programs: print the failed condition and where, exit 1. */
#ifndef CASCADE_KERNELS_CHECK_H
#define CASCADE_KERNELS_CHECK_H
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond, ...)                                                                                      \
    do {                                                                                                      \
        if (!(cond)) {                                                                                        \
            fprintf(stderr, "%s:%d: failed: %s: ", __FILE__, __LINE__, #cond);                                \
            fprintf(stderr, __VA_ARGS__);                                                                     \
            fprintf(stderr, "\n");                                                                            \
            exit(1);                                                                                          \
        }                                                                                                     \
    } while (0)
#endif
