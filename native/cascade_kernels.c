/* The C ABI of include/cascade_kernels.h: metadata over the generated variant table, variant choice, launch. */
#include "cascade_kernels.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver.h"
#include "variants.h"

#define MAX_CONTEXTS 64 /* CUDA contexts one process launches in: one per GPU in practice */
#define MAX_DEVICES 64
#define MAX_GRID_Y 65535 /* B * H programs on the grid's y axis */

/* ---- errors ---------------------------------------------------------------------------------------------- */

static __thread char last_error[512];

static int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

static int cuda_fail(const cascade_driver *drv, CUresult r, const char *call) {
    const char *name = "?";
    drv->GetErrorName(r, &name);
    return fail(CASCADE_ERROR_CUDA, "%s failed: %s (%d)", call, name, (int)r);
}

const char *cascade_last_error(void) { return last_error; }

const char *cascade_status_string(int status) {
    switch (status) {
    case CASCADE_OK: return "ok";
    case CASCADE_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case CASCADE_ERROR_NOT_COVERED: return "not covered by the embedded kernels";
    case CASCADE_ERROR_NO_DRIVER: return "no CUDA driver";
    case CASCADE_ERROR_CUDA: return "CUDA driver error";
    default: return "unknown status";
    }
}

/* ---- metadata ------------------------------------------------------------------------------------------- */

int cascade_abi_version(void) { return CASCADE_KERNELS_ABI_VERSION; }
const char *cascade_triton_version(void) { return cascade_triton_version_string; }
const char *cascade_kernel_key(void) { return cascade_kernel_key_string; }
int cascade_variant_count(void) { return cascade_variant_table_size; }

int cascade_variant_get(int index, cascade_variant *out) {
    if (index < 0 || index >= cascade_variant_table_size || !out)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "variant index %d out of range [0, %d)", index,
                    cascade_variant_table_size);
    const cascade_variant_entry *e = &cascade_variant_table[index];
    *out = (cascade_variant){e->name, e->arch_name, e->arch, e->dtype, e->head_dim, e->has_mask, e->block_m,
                             e->block_n, e->num_warps, e->num_stages, e->shared_bytes, e->cubin_size};
    return CASCADE_OK;
}

static char architectures[128];
static pthread_once_t architectures_once = PTHREAD_ONCE_INIT;

static void list_architectures(void) { /* distinct arch_names in table order: "sm_80 sm_90a" */
    for (int i = 0; i < cascade_variant_table_size; i++) {
        const char *a = cascade_variant_table[i].arch_name;
        int seen = 0;
        for (int j = 0; j < i; j++)
            seen |= strcmp(cascade_variant_table[j].arch_name, a) == 0;
        if (!seen && strlen(architectures) + strlen(a) + 2 < sizeof architectures) {
            if (architectures[0])
                strcat(architectures, " ");
            strcat(architectures, a);
        }
    }
}

const char *cascade_architectures(void) {
    pthread_once(&architectures_once, list_architectures);
    return architectures;
}

/* ---- which variant runs where --------------------------------------------------------------------------- */

/* A cubin for sm_XY runs on devices of major X and minor >= Y; one for sm_XYa (Triton's choice for 9.0) only
 * on X.Y itself. Among the compatible variants, the highest architecture wins. -1 if none. */
static int pick(int major, int minor, int dtype, int head_dim, int has_mask) {
    int best = -1;
    for (int i = 0; i < cascade_variant_table_size; i++) {
        const cascade_variant_entry *e = &cascade_variant_table[i];
        if (e->dtype != dtype || e->head_dim != head_dim || e->has_mask != !!has_mask)
            continue;
        int arch_major = e->arch / 10, arch_minor = e->arch % 10;
        int exact_only = e->arch_name[strlen(e->arch_name) - 1] == 'a';
        int runs = major == arch_major && (exact_only ? minor == arch_minor : minor >= arch_minor);
        if (runs && (best < 0 || e->arch > cascade_variant_table[best].arch))
            best = i;
    }
    return best;
}

int cascade_covers(int major, int minor, int dtype, int head_dim, int has_mask) {
    return pick(major, minor, dtype, head_dim, has_mask) >= 0;
}

static int any_arch(int dtype, int head_dim, int has_mask) {
    for (int i = 0; i < cascade_variant_table_size; i++) {
        const cascade_variant_entry *e = &cascade_variant_table[i];
        if (e->dtype == dtype && e->head_dim == head_dim && e->has_mask == !!has_mask)
            return 1;
    }
    return 0;
}

int cascade_driver_status(void) {
    const char *why = "";
    if (!cascade_driver_get(&why))
        return fail(CASCADE_ERROR_NO_DRIVER, "%s", why);
    return CASCADE_OK;
}

/* ---- loaded functions, per context ---------------------------------------------------------------------- */

enum { NOT_LOADED = 0, LOADED = 1, REFUSED = 2 }; /* REFUSED: this device cannot run it (see function_for) */

typedef struct {
    unsigned long long key; /* cuCtxGetId where the driver has it (unique for the process's life), else the
                               CUcontext's address (a context destroyed and re-created there would reuse
                               stale functions: the one reason to prefer a driver >= 12.0) */
    CUfunction *functions;  /* [cascade_variant_table_size] */
    unsigned char *state;   /* [cascade_variant_table_size] NOT_LOADED / LOADED / REFUSED */
} context_slot;

static context_slot slots[MAX_CONTEXTS];
static CUcontext primary[MAX_DEVICES]; /* retained once, never released: the runtime does the same */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* The function for variant `index` in context `ctx` (current on this thread), loading its module on first use. */
static int function_for(const cascade_driver *drv, CUcontext ctx, CUdevice dev, int index, CUfunction *fn) {
    unsigned long long key = (unsigned long long)(uintptr_t)ctx;
    if (drv->CtxGetId && drv->CtxGetId(ctx, &key) != CUDA_SUCCESS)
        key = (unsigned long long)(uintptr_t)ctx;
    const cascade_variant_entry *e = &cascade_variant_table[index];
    int status = CASCADE_OK;
    pthread_mutex_lock(&lock);
    context_slot *slot = NULL;
    for (int i = 0; i < MAX_CONTEXTS && !slot; i++) {
        if (slots[i].functions && slots[i].key == key)
            slot = &slots[i];
        else if (!slots[i].functions) { /* first free slot: this context is new */
            slots[i].functions = calloc((size_t)cascade_variant_table_size, sizeof(CUfunction));
            slots[i].state = calloc((size_t)cascade_variant_table_size, 1);
            if (!slots[i].functions || !slots[i].state) {
                free(slots[i].functions), free(slots[i].state);
                slots[i].functions = NULL, slots[i].state = NULL;
                pthread_mutex_unlock(&lock);
                return fail(CASCADE_ERROR_CUDA, "out of host memory");
            }
            slots[i].key = key;
            slot = &slots[i];
        }
    }
    if (!slot) {
        status = fail(CASCADE_ERROR_NOT_COVERED, "more than %d CUDA contexts", MAX_CONTEXTS);
    } else if (slot->state[index] == REFUSED) {
        status = fail(CASCADE_ERROR_NOT_COVERED, "%s does not run on this device (refused at its first launch)",
                      e->name);
    } else if (slot->state[index] == NOT_LOADED) {
        CUmodule module;
        CUresult r = drv->ModuleLoadData(&module, e->cubin); /* never unloaded: functions live as long as ctx */
        if (r == CUDA_ERROR_NO_BINARY_FOR_GPU || r == CUDA_ERROR_INVALID_IMAGE ||
            r == CUDA_ERROR_UNSUPPORTED_PTX_VERSION) { /* e.g. a driver older than the ptxas that built it */
            slot->state[index] = REFUSED;
            const char *name = "?";
            drv->GetErrorName(r, &name);
            status = fail(CASCADE_ERROR_NOT_COVERED, "the driver refuses %s's cubin: %s", e->name, name);
        } else if (r != CUDA_SUCCESS) {
            status = cuda_fail(drv, r, "cuModuleLoadData");
        } else if ((r = drv->ModuleGetFunction(&slot->functions[index], module, e->kernel)) != CUDA_SUCCESS) {
            status = cuda_fail(drv, r, "cuModuleGetFunction");
        } else {
            int optin = 0;
            drv->DeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
            if (e->shared_bytes > optin) { /* an sm_80 cubin on an 8.6 part, say: 99 KB, not 163 KB */
                slot->state[index] = REFUSED;
                status = fail(CASCADE_ERROR_NOT_COVERED, "%s needs %d bytes of shared memory, the device allows %d",
                              e->name, e->shared_bytes, optin);
            } else if (e->shared_bytes > 48 * 1024 && /* above 48 KB dynamic shared memory is opt-in */
                       (r = drv->FuncSetAttribute(slot->functions[index],
                                                  CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                  e->shared_bytes)) != CUDA_SUCCESS) {
                status = cuda_fail(drv, r, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
            } else {
                slot->state[index] = LOADED;
            }
        }
    }
    if (status == CASCADE_OK)
        *fn = slot->functions[index];
    pthread_mutex_unlock(&lock);
    return status;
}

static int primary_context(const cascade_driver *drv, int ordinal, CUcontext *ctx) {
    if (ordinal < 0 || ordinal >= MAX_DEVICES)
        return fail(CASCADE_ERROR_NOT_COVERED, "device ordinal %d is beyond %d", ordinal, MAX_DEVICES);
    pthread_mutex_lock(&lock);
    CUresult r = CUDA_SUCCESS;
    if (!primary[ordinal])
        r = drv->DevicePrimaryCtxRetain(&primary[ordinal], (CUdevice)ordinal);
    *ctx = primary[ordinal];
    pthread_mutex_unlock(&lock);
    return r == CUDA_SUCCESS ? CASCADE_OK : cuda_fail(drv, r, "cuDevicePrimaryCtxRetain");
}

/* ---- launch --------------------------------------------------------------------------------------------- */

static int64_t max_offset(const int64_t dims[], const int64_t strides[], int n) {
    int64_t m = 0;
    for (int i = 0; i < n; i++)
        m += (dims[i] - 1) * strides[i];
    return m;
}

/* The specialisations the cubins were compiled with (native/generate.py: UNIT_STRIDES, DIVISIBLE_BY_16) and
 * the kernel's 32-bit offsets. */
static int check_layout(const char *name, const void *p, const int64_t s[4], const int64_t dims[4]) {
    if (s[3] != 1)
        return fail(CASCADE_ERROR_NOT_COVERED, "%s's head dim stride is %" PRId64 ", the cubins need 1", name, s[3]);
    for (int i = 0; i < 3; i++)
        if (s[i] < 0 || s[i] % 16 != 0)
            return fail(CASCADE_ERROR_NOT_COVERED, "%s's stride %d is %" PRId64 ", the cubins need a multiple of 16",
                        name, i, s[i]);
    if ((uintptr_t)p % 16 != 0)
        return fail(CASCADE_ERROR_NOT_COVERED, "%s is not 16-byte aligned", name);
    if (max_offset(dims, s, 4) > INT32_MAX || s[0] > INT32_MAX)
        return fail(CASCADE_ERROR_NOT_COVERED, "%s spans more than 2^31 elements", name);
    return CASCADE_OK;
}

static int32_t bucket(int64_t n) { /* next power of two, as the JIT launcher passes LQ_BUCKET / LK_BUCKET */
    int64_t b = 1;
    while (b < n)
        b <<= 1;
    return (int32_t)b;
}

int cascade_attention(void *stream, int dtype, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                      int64_t head_dim, float scale,
                      const void *q, const int64_t q_stride[4],
                      const void *k, const int64_t k_stride[4],
                      const void *v, const int64_t v_stride[4],
                      void *out, const int64_t out_stride[4],
                      const uint8_t *key_padding_mask, const int64_t mask_stride[2]) {
    last_error[0] = '\0';
    if (!q || !k || !v || !out || !q_stride || !k_stride || !v_stride || !out_stride)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "q, k, v, out and their strides must not be NULL");
    if (key_padding_mask && !mask_stride)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "key_padding_mask given without mask_stride");
    if (dtype != CASCADE_FLOAT16 && dtype != CASCADE_BFLOAT16)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "dtype %d is neither CASCADE_FLOAT16 nor CASCADE_BFLOAT16", dtype);
    if (batch < 1 || heads < 1 || len_q < 1 || len_k < 1 || head_dim < 1)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "sizes must be >= 1: B=%" PRId64 " H=%" PRId64 " Lq=%" PRId64
                    " Lk=%" PRId64 " D=%" PRId64, batch, heads, len_q, len_k, head_dim);
    int has_mask = key_padding_mask != NULL;
    if (head_dim > 1024 || !any_arch(dtype, (int)head_dim, has_mask))
        return fail(CASCADE_ERROR_NOT_COVERED, "no embedded variant for dtype %d, head dim %" PRId64 ", %s", dtype,
                    head_dim, has_mask ? "masked" : "unmasked");
    if (batch * heads > MAX_GRID_Y)
        return fail(CASCADE_ERROR_NOT_COVERED, "B * H = %" PRId64 " exceeds the grid's %d", batch * heads,
                    MAX_GRID_Y);
    const int64_t q_dims[4] = {batch, heads, len_q, head_dim}, kv_dims[4] = {batch, heads, len_k, head_dim};
    int status;
    if ((status = check_layout("q", q, q_stride, q_dims)) || (status = check_layout("k", k, k_stride, kv_dims)) ||
        (status = check_layout("v", v, v_stride, kv_dims)) ||
        (status = check_layout("out", out, out_stride, q_dims)))
        return status;
    const int64_t mask_dims[2] = {batch, len_k};
    if (has_mask && (mask_stride[0] < 0 || mask_stride[1] < 0 || mask_stride[0] > INT32_MAX ||
                     mask_stride[1] > INT32_MAX || max_offset(mask_dims, mask_stride, 2) > INT32_MAX))
        return fail(CASCADE_ERROR_NOT_COVERED, "key_padding_mask's strides do not fit 32 bits");

    const char *why = "";
    const cascade_driver *drv = cascade_driver_get(&why);
    if (!drv)
        return fail(CASCADE_ERROR_NO_DRIVER, "%s", why);

    /* The context: the thread's current one, else the primary context of q's device. */
    int q_device = -1;
    CUresult r = drv->PointerGetAttribute(&q_device, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (CUdeviceptr)q);
    if (r != CUDA_SUCCESS)
        return fail(CASCADE_ERROR_INVALID_ARGUMENT, "q is not CUDA device memory (cuPointerGetAttribute: %d)", (int)r);
    CUcontext ctx = NULL;
    if ((r = drv->CtxGetCurrent(&ctx)) != CUDA_SUCCESS)
        return cuda_fail(drv, r, "cuCtxGetCurrent");
    int pushed = 0;
    if (!ctx) {
        if ((status = primary_context(drv, q_device, &ctx)))
            return status;
        if ((r = drv->CtxPushCurrent(ctx)) != CUDA_SUCCESS)
            return cuda_fail(drv, r, "cuCtxPushCurrent");
        pushed = 1;
    }

    CUdevice dev;
    int major = 0, minor = 0, index = -1;
    CUfunction fn = NULL;
    if ((r = drv->CtxGetDevice(&dev)) != CUDA_SUCCESS) {
        status = cuda_fail(drv, r, "cuCtxGetDevice");
    } else if ((int)dev != q_device) {
        status = fail(CASCADE_ERROR_INVALID_ARGUMENT, "q is on device %d but the current context is on device %d",
                      q_device, (int)dev);
    } else if ((r = drv->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) ||
               (r = drv->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))) {
        status = cuda_fail(drv, r, "cuDeviceGetAttribute(COMPUTE_CAPABILITY)");
    } else if ((index = pick(major, minor, dtype, (int)head_dim, has_mask)) < 0) {
        status = fail(CASCADE_ERROR_NOT_COVERED, "no embedded cubin runs on compute capability %d.%d (have %s)",
                      major, minor, cascade_architectures());
    } else {
        status = function_for(drv, ctx, dev, index, &fn);
    }

    if (status == CASCADE_OK) {
        const cascade_variant_entry *e = &cascade_variant_table[index];
        /* The kernel's runtime parameters in order (native/generate.py: RUNTIME_ARGS), then Triton's two
         * scratch pointers, NULL: the generator checked both scratch sizes are 0. */
        CUdeviceptr pq = (CUdeviceptr)q, pk = (CUdeviceptr)k, pv = (CUdeviceptr)v, po = (CUdeviceptr)out;
        CUdeviceptr pm = (CUdeviceptr)key_padding_mask, scratch = 0; /* NULL mask: HAS_MASK=False never reads it */
        int32_t ints[19] = {
            (int32_t)q_stride[0], (int32_t)q_stride[1], (int32_t)q_stride[2],
            (int32_t)k_stride[0], (int32_t)k_stride[1], (int32_t)k_stride[2],
            (int32_t)v_stride[0], (int32_t)v_stride[1], (int32_t)v_stride[2],
            (int32_t)out_stride[0], (int32_t)out_stride[1], (int32_t)out_stride[2],
            has_mask ? (int32_t)mask_stride[0] : 0, has_mask ? (int32_t)mask_stride[1] : 0,
            (int32_t)heads, (int32_t)len_q, (int32_t)len_k, bucket(len_q), bucket(len_k)};
        void *params[27] = {&pq, &pk, &pv, &po, &pm, &scale};
        for (int i = 0; i < 19; i++)
            params[6 + i] = &ints[i];
        params[25] = &scratch, params[26] = &scratch;
        unsigned grid_x = (unsigned)((len_q + e->block_m - 1) / e->block_m), grid_y = (unsigned)(batch * heads);
        r = drv->LaunchKernel(fn, grid_x, grid_y, 1, 32u * (unsigned)e->num_warps, 1, 1, (unsigned)e->shared_bytes,
                              (CUstream)stream, params, NULL);
        if (r != CUDA_SUCCESS)
            status = cuda_fail(drv, r, "cuLaunchKernel");
    }
    if (pushed) {
        CUcontext popped;
        drv->CtxPopCurrent(&popped);
    }
    return status;
}
