/* cascade_kernels: the cascade's Triton attention kernel, compiled ahead of time, behind a C ABI.
 *
 *   softmax(q k^T * scale, masked) v  for  q (B, H, Lq, D), k and v (B, H, Lk, D), out (B, H, Lq, D),
 *   key_padding_mask (B, Lk) of bytes, nonzero = attend (a row with nothing to attend to gives zeros).
 *
 * The cubins (sm_80, which runs on any 8.x GPU, and sm_90a, for 9.0) are embedded in the library and launched
 * through the CUDA driver API on the caller's stream. The driver is loaded at run time (dlopen of
 * libcuda.so.1, or the file named by CASCADE_KERNELS_LIBCUDA); the library loads and answers every metadata
 * call on a machine without one, and a launch there returns CASCADE_ERROR_NO_DRIVER.
 *
 * Every function is thread-safe. Error details: cascade_last_error() (per thread).
 */
#ifndef CASCADE_KERNELS_H
#define CASCADE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CASCADE_API __attribute__((visibility("default"))) /* the library hides everything else */
#else
#define CASCADE_API
#endif

#define CASCADE_KERNELS_ABI_VERSION 1 /* bumped on any change to this header's types or functions */

typedef enum {
    CASCADE_OK = 0,
    CASCADE_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a non-positive size, mismatched arguments */
    CASCADE_ERROR_NOT_COVERED = 2,      /* valid, but no embedded variant runs it (dtype, head dim, layout, GPU):
                                           run the JIT path instead */
    CASCADE_ERROR_NO_DRIVER = 3,        /* libcuda.so.1 missing, or cuInit failed (no GPU) */
    CASCADE_ERROR_CUDA = 4              /* a driver call failed; cascade_last_error() names it */
} cascade_status;

typedef enum { CASCADE_FLOAT16 = 0, CASCADE_BFLOAT16 = 1 } cascade_dtype;

typedef struct {
    const char *name;      /* "attention_sm90_fp16_d64_mask" */
    const char *arch_name; /* "sm_80", "sm_90a": read from the cubin at build time */
    int32_t arch;          /* 80, 90 */
    int32_t dtype;         /* cascade_dtype */
    int32_t head_dim;
    int32_t has_mask;
    int32_t block_m, block_n, num_warps, num_stages;
    int32_t shared_bytes;
    uint64_t cubin_size;
} cascade_variant;

CASCADE_API int cascade_abi_version(void);             /* CASCADE_KERNELS_ABI_VERSION the library was built with */
CASCADE_API const char *cascade_triton_version(void);  /* the Triton that compiled the cubins */
CASCADE_API const char *cascade_kernel_key(void);      /* Triton's cache key of the kernel source compiled */
CASCADE_API const char *cascade_architectures(void);   /* the cubins' SMs, space-separated: "sm_80 sm_90a" */
CASCADE_API int cascade_variant_count(void);
CASCADE_API int cascade_variant_get(int index, cascade_variant *out); /* CASCADE_OK or CASCADE_ERROR_INVALID_ARGUMENT */

/* 1 if a variant runs (dtype, head_dim, has_mask) on a GPU of compute capability major.minor, else 0.
 * Static: no driver needed. A launch can still answer NOT_COVERED for a layout (see cascade_attention). */
CASCADE_API int cascade_covers(int major, int minor, int dtype, int head_dim, int has_mask);

/* CASCADE_OK if the driver loads and initialises, else CASCADE_ERROR_NO_DRIVER. */
CASCADE_API int cascade_driver_status(void);

CASCADE_API const char *cascade_status_string(int status);
CASCADE_API const char *cascade_last_error(void); /* this thread's last failure, "" if none */

/* Enqueue the attention on `stream` (a CUstream / cudaStream_t; NULL = the legacy default stream) and return
 * without waiting. Strides are in elements. Runs in the calling thread's current CUDA context, or, if none is
 * current, in the primary context of q's device. Covered layouts: contiguous head dim (stride 1), the other
 * strides of q, k, v, out multiples of 16, the four pointers 16-byte aligned, every offset below 2^31,
 * B * H <= 65535; anything else answers CASCADE_ERROR_NOT_COVERED. The first launch of a variant in a context
 * loads its module: make it before capturing a CUDA graph. key_padding_mask may be NULL (mask_stride ignored). */
CASCADE_API int cascade_attention(void *stream, int dtype, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                      int64_t head_dim, float scale,
                      const void *q, const int64_t q_stride[4],
                      const void *k, const int64_t k_stride[4],
                      const void *v, const int64_t v_stride[4],
                      void *out, const int64_t out_stride[4],
                      const uint8_t *key_padding_mask, const int64_t mask_stride[2]);

#ifdef __cplusplus
}
#endif

#endif
