/* The table native/generate.py writes (build/.../attention_kernels.c) and cascade_kernels.c reads. Internal. */
#ifndef CASCADE_KERNELS_VARIANTS_H
#define CASCADE_KERNELS_VARIANTS_H

#include <stddef.h>

typedef struct {
    const char *name;      /* "attention_sm90_fp16_d64_mask" */
    const char *arch_name; /* the cubin's SM as cuobjdump reads it: "sm_80", "sm_90a" */
    const char *kernel;    /* the entry point's symbol in the cubin */
    int arch;              /* 80, 90 */
    int dtype;             /* cascade_dtype */
    int head_dim;
    int has_mask;
    int block_m, block_n, num_warps, num_stages; /* the fixed autotune config it was compiled with */
    int shared_bytes;      /* dynamic shared memory the launch must give it */
    const unsigned char *cubin;
    size_t cubin_size;
} cascade_variant_entry;

extern const cascade_variant_entry cascade_variant_table[];
extern const int cascade_variant_table_size;
extern const char cascade_triton_version_string[];
extern const char cascade_kernel_key_string[];

#endif
