/* The library loads (this program links it) and describes its cubins; no GPU or driver needed. */
#include <string.h>

#include "cascade_kernels.h"
#include "check.h"

int main(void) {
    CHECK(cascade_abi_version() == CASCADE_KERNELS_ABI_VERSION, "abi %d", cascade_abi_version());
    const char *archs = cascade_architectures();
    printf("architectures: %s; Triton %s; %d variants\n", archs, cascade_triton_version(), cascade_variant_count());
    CHECK(strstr(archs, "sm_80") && strstr(archs, "sm_90"), "architectures '%s'", archs);
    CHECK(strlen(cascade_kernel_key()) > 0, "empty kernel key");

    int n = cascade_variant_count(), seen_80 = 0, seen_90 = 0, seen_mask = 0, seen_d64_f16 = 0, seen_d64_bf16 = 0;
    CHECK(n > 0, "no variants");
    for (int i = 0; i < n; i++) {
        cascade_variant v;
        CHECK(cascade_variant_get(i, &v) == CASCADE_OK, "variant %d: %s", i, cascade_last_error());
        printf("  %-32s %-7s D=%-3d mask=%d BLOCK_M=%d BLOCK_N=%d warps=%d stages=%d shared=%d cubin=%llu B\n",
               v.name, v.arch_name, v.head_dim, v.has_mask, v.block_m, v.block_n, v.num_warps, v.num_stages,
               v.shared_bytes, (unsigned long long)v.cubin_size);
        CHECK(v.cubin_size > 1000, "%s: cubin of %llu bytes", v.name, (unsigned long long)v.cubin_size);
        CHECK(strncmp(v.arch_name, "sm_", 3) == 0 && atoi(v.arch_name + 3) == v.arch, "%s: arch %d vs '%s'", v.name,
              v.arch, v.arch_name);
        seen_80 |= v.arch == 80, seen_90 |= v.arch == 90, seen_mask |= v.has_mask;
        seen_d64_f16 |= v.head_dim == 64 && v.dtype == CASCADE_FLOAT16;
        seen_d64_bf16 |= v.head_dim == 64 && v.dtype == CASCADE_BFLOAT16;
    }
    CHECK(seen_80 && seen_90 && seen_mask && seen_d64_f16 && seen_d64_bf16, "missing the cascade's variants");
    cascade_variant v;
    CHECK(cascade_variant_get(n, &v) == CASCADE_ERROR_INVALID_ARGUMENT, "index past the end accepted");

    /* Which GPUs run what: sm_80 cubins on any 8.x, sm_90a only on 9.0, nothing on 7.5 or 10.0. */
    CHECK(cascade_covers(8, 0, CASCADE_FLOAT16, 64, 0) && cascade_covers(8, 6, CASCADE_BFLOAT16, 64, 1), "sm_8x");
    CHECK(cascade_covers(9, 0, CASCADE_FLOAT16, 64, 1), "sm_90");
    CHECK(!cascade_covers(7, 5, CASCADE_FLOAT16, 64, 0) && !cascade_covers(10, 0, CASCADE_FLOAT16, 64, 0) &&
              !cascade_covers(9, 1, CASCADE_FLOAT16, 64, 0), "other GPUs");
    CHECK(!cascade_covers(9, 0, CASCADE_FLOAT16, 40, 0), "head dim 40 has no variant");

    /* Whatever this machine has, asking about the driver answers, never crashes. */
    int status = cascade_driver_status();
    printf("driver: %s%s%s\n", cascade_status_string(status), status ? ": " : "", status ? cascade_last_error() : "");
    CHECK(status == CASCADE_OK || status == CASCADE_ERROR_NO_DRIVER, "driver status %d", status);
    return 0;
}
