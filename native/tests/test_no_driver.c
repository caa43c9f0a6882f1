/* Without a driver, a launch returns CASCADE_ERROR_NO_DRIVER and says why; it never crashes. The driver is
 * pointed at a missing file, so this also holds (and is tested) on a machine that has one. */
#include <stdint.h>
#include <string.h>

#include "cascade_kernels.h"
#include "check.h"

int main(void) {
    setenv("CASCADE_KERNELS_LIBCUDA", "/nonexistent/cascade-kernels-test/libcuda.so.1", 1); /* before any load */
    const int64_t b = 2, h = 3, lq = 100, lk = 177, d = 64;
    int64_t qs[4] = {h * lq * d, lq * d, d, 1}, ks[4] = {h * lk * d, lk * d, d, 1}, ms[2] = {lk, 1};
    /* Aligned addresses that are never dereferenced: with no driver nothing reaches a GPU. */
    void *q = (void *)(uintptr_t)0x10000, *k = (void *)(uintptr_t)0x20000, *v = (void *)(uintptr_t)0x30000;
    void *o = (void *)(uintptr_t)0x40000;
    const uint8_t *mask = (const uint8_t *)(uintptr_t)0x50000;

    CHECK(cascade_driver_status() == CASCADE_ERROR_NO_DRIVER, "driver status");
    int s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, lq, lk, d, 0.125f, q, qs, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_NO_DRIVER, "status %d (%s)", s, cascade_last_error());
    CHECK(strstr(cascade_last_error(), "no-such") || strstr(cascade_last_error(), "cascade-kernels-test"),
          "the error names the driver it tried: '%s'", cascade_last_error());
    printf("launch without a driver: %s: %s\n", cascade_status_string(s), cascade_last_error());
    s = cascade_attention(NULL, CASCADE_BFLOAT16, b, h, lq, lk, d, 0.125f, q, qs, k, ks, v, ks, o, qs, mask, ms);
    CHECK(s == CASCADE_ERROR_NO_DRIVER, "masked: status %d (%s)", s, cascade_last_error());

    /* Argument errors and coverage are answered before the driver is needed. */
    s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, lq, lk, d, 0.125f, NULL, qs, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_INVALID_ARGUMENT, "NULL q: status %d", s);
    s = cascade_attention(NULL, 7, b, h, lq, lk, d, 0.125f, q, qs, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_INVALID_ARGUMENT, "bad dtype: status %d", s);
    s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, 0, lk, d, 0.125f, q, qs, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_INVALID_ARGUMENT, "Lq = 0: status %d", s);
    s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, lq, lk, 40, 0.125f, q, qs, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_NOT_COVERED, "head dim 40: status %d", s);
    int64_t strided[4] = {h * lq * d * 2, lq * d * 2, d * 2, 2}; /* every other element of the head dim */
    s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, lq, lk, d, 0.125f, q, strided, k, ks, v, ks, o, qs, NULL, NULL);
    CHECK(s == CASCADE_ERROR_NOT_COVERED, "head dim stride 2: status %d", s);
    s = cascade_attention(NULL, CASCADE_FLOAT16, b, h, lq, lk, d, 0.125f, (char *)q + 2, qs, k, ks, v, ks, o, qs,
                          NULL, NULL);
    CHECK(s == CASCADE_ERROR_NOT_COVERED, "misaligned q: status %d", s);
    return 0;
}
