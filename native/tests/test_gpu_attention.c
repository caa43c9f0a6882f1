/* On a GPU the cubins cover: the library's output against a float64 reference computed here, for float16 and
 * bfloat16, with and without a key padding mask, odd lengths (IF's joint attention: 77 text keys + image keys).
 * Without a driver or such a GPU it exits 77, which CMakeLists.txt declares ctest's SKIP_RETURN_CODE.
 *
 * The test drives the GPU through the driver API itself (dlopen, as the library does), so it needs no runtime
 * or torch. Inputs are multiples of 1/64 in [-1, 1]: exact in float16 and bfloat16, so only the kernel rounds. */
#include <cuda.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cascade_kernels.h"
#include "check.h"

#define SKIP 77

static CUresult (*Init)(unsigned);
static CUresult (*DeviceGet)(CUdevice *, int);
static CUresult (*DeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
static CUresult (*PrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*CtxPush)(CUcontext);
static CUresult (*CtxPop)(CUcontext *);
static CUresult (*MemAlloc)(CUdeviceptr *, size_t);
static CUresult (*MemFree)(CUdeviceptr);
static CUresult (*HtoD)(CUdeviceptr, const void *, size_t);
static CUresult (*DtoH)(void *, CUdeviceptr, size_t);
static CUresult (*CtxSynchronize)(void);
static CUresult (*StreamCreate)(CUstream *, unsigned);

static int load_driver(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        return 0;
    struct { void **slot; const char *name; } syms[] = {
        {(void **)&Init, "cuInit"}, {(void **)&DeviceGet, "cuDeviceGet"},
        {(void **)&DeviceGetAttribute, "cuDeviceGetAttribute"},
        {(void **)&PrimaryCtxRetain, "cuDevicePrimaryCtxRetain"}, {(void **)&CtxPush, "cuCtxPushCurrent_v2"},
        {(void **)&CtxPop, "cuCtxPopCurrent_v2"}, {(void **)&MemAlloc, "cuMemAlloc_v2"},
        {(void **)&MemFree, "cuMemFree_v2"}, {(void **)&HtoD, "cuMemcpyHtoD_v2"}, {(void **)&DtoH, "cuMemcpyDtoH_v2"},
        {(void **)&CtxSynchronize, "cuCtxSynchronize"}, {(void **)&StreamCreate, "cuStreamCreate"}};
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        if (!(*syms[i].slot = dlsym(lib, syms[i].name)))
            return 0;
    return Init(0) == CUDA_SUCCESS;
}

#define CU(call) CHECK((call) == CUDA_SUCCESS, "%s", #call)

/* float <-> 16-bit storage for values that are exact in the format (normal numbers and zero). */
static uint16_t to_f16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if (x == 0.0f)
        return (uint16_t)(u >> 16);
    uint32_t sign = u >> 31, exp = (u >> 23) & 0xff, mant = u & 0x7fffff;
    return (uint16_t)((sign << 15) | ((exp - 127 + 15) << 10) | (mant >> 13));
}
static float from_f16(uint16_t h) {
    uint32_t sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) { /* zero or subnormal */
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 31)
        u = (sign << 31) | 0x7f800000u | (mant << 13);
    else
        u = (sign << 31) | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t to_bf16(float x) { uint32_t u; memcpy(&u, &x, 4); return (uint16_t)(u >> 16); }
static float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static uint32_t rng = 12345u;
static float sample(void) { /* k / 64 for k in [-64, 64] */
    rng = rng * 1664525u + 1013904223u;
    return (float)((int)(rng >> 16) % 129 - 64) / 64.0f;
}

/* out[b,h,i,:] = softmax_j(q.k_j * scale, masked) v, in float64; a fully masked row gives zeros. */
static void reference(const float *q, const float *k, const float *v, const uint8_t *mask, double *out, int B, int H,
                      int LQ, int LK, int D, double scale) {
    double *s = malloc(sizeof(double) * LK);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < LQ; i++) {
                const float *qi = q + (((size_t)b * H + h) * LQ + i) * D;
                double m = -INFINITY, l = 0;
                for (int j = 0; j < LK; j++) {
                    const float *kj = k + (((size_t)b * H + h) * LK + j) * D;
                    double dot = 0;
                    for (int d = 0; d < D; d++)
                        dot += (double)qi[d] * kj[d];
                    s[j] = mask && !mask[b * LK + j] ? -INFINITY : dot * scale;
                    m = fmax(m, s[j]);
                }
                double *oi = out + (((size_t)b * H + h) * LQ + i) * D;
                memset(oi, 0, sizeof(double) * D);
                if (m == -INFINITY)
                    continue;
                for (int j = 0; j < LK; j++) {
                    double p = exp(s[j] - m);
                    l += p;
                    const float *vj = v + (((size_t)b * H + h) * LK + j) * D;
                    for (int d = 0; d < D; d++)
                        oi[d] += p * vj[d];
                }
                for (int d = 0; d < D; d++)
                    oi[d] /= l;
            }
    free(s);
}

static void run_case(int dtype, int D, int masked, CUstream stream, CUcontext ctx, int with_current_context) {
    const int B = 2, H = 3, LQ = 100, LK = 77 + 100;
    const size_t nq = (size_t)B * H * LQ * D, nk = (size_t)B * H * LK * D;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nk * 4);
    uint16_t *hq = malloc(nq * 2), *hk = malloc(nk * 2), *hv = malloc(nk * 2), *ho = malloc(nq * 2);
    uint8_t mask[2 * 177];
    double *ref = malloc(nq * 8);
    for (size_t i = 0; i < nq; i++)
        q[i] = sample(), hq[i] = dtype == CASCADE_FLOAT16 ? to_f16(q[i]) : to_bf16(q[i]);
    for (size_t i = 0; i < nk; i++) {
        k[i] = sample(), hk[i] = dtype == CASCADE_FLOAT16 ? to_f16(k[i]) : to_bf16(k[i]);
        v[i] = sample(), hv[i] = dtype == CASCADE_FLOAT16 ? to_f16(v[i]) : to_bf16(v[i]);
    }
    for (int j = 0; j < LK; j++) {
        mask[j] = j < 10 || j >= 77; /* batch 0: a 10-token prompt padded to 77, then the image tokens */
        mask[LK + j] = j % 3 != 0;   /* batch 1: scattered holes */
    }
    const double scale = 1.0 / sqrt((double)D);
    reference(q, k, v, masked ? mask : NULL, ref, B, H, LQ, LK, D, scale);

    CU(CtxPush(ctx));
    CUdeviceptr dq, dk, dv, dout, dm;
    CU(MemAlloc(&dq, nq * 2)); CU(MemAlloc(&dk, nk * 2)); CU(MemAlloc(&dv, nk * 2)); CU(MemAlloc(&dout, nq * 2));
    CU(MemAlloc(&dm, sizeof mask));
    CU(HtoD(dq, hq, nq * 2)); CU(HtoD(dk, hk, nk * 2)); CU(HtoD(dv, hv, nk * 2)); CU(HtoD(dm, mask, sizeof mask));
    memset(ho, 0xff, nq * 2); /* NaN everywhere: every output element must be written */
    CU(HtoD(dout, ho, nq * 2));
    CU(CtxSynchronize());
    if (!with_current_context) { /* the library must fall back to q's device's primary context */
        CUcontext popped;
        CU(CtxPop(&popped));
    }
    int64_t qs[4] = {(int64_t)H * LQ * D, (int64_t)LQ * D, D, 1}, ks[4] = {(int64_t)H * LK * D, (int64_t)LK * D, D, 1};
    int64_t ms[2] = {LK, 1};
    int s = cascade_attention(with_current_context ? (void *)stream : NULL, dtype, B, H, LQ, LK, D, (float)scale,
                              (void *)dq, qs, (void *)dk, ks, (void *)dv, ks, (void *)dout, qs,
                              masked ? (const uint8_t *)dm : NULL, ms);
    CHECK(s == CASCADE_OK, "dtype %d D %d mask %d: %s: %s", dtype, D, masked, cascade_status_string(s),
          cascade_last_error());
    if (!with_current_context)
        CU(CtxPush(ctx));
    CU(CtxSynchronize());
    CU(DtoH(ho, dout, nq * 2));
    double worst = 0;
    for (size_t i = 0; i < nq; i++) {
        double got = dtype == CASCADE_FLOAT16 ? from_f16(ho[i]) : from_bf16(ho[i]);
        double err = fabs(got - ref[i]);
        CHECK(err == err, "element %zu is NaN: not written", i);
        worst = fmax(worst, err);
    }
    /* Outputs are below 1 in magnitude: one rounding of the output is 2^-11 (float16) or 2^-8 (bfloat16);
     * the probabilities are rounded to the input dtype before P @ V, so allow a few of those. */
    double tol = dtype == CASCADE_FLOAT16 ? 4e-3 : 2.5e-2;
    printf("%-8s D=%-3d mask=%d %s: max |err| = %.2e (tolerance %.1e)\n",
           dtype == CASCADE_FLOAT16 ? "float16" : "bfloat16", D, masked,
           with_current_context ? "current context, own stream" : "no current context, NULL stream", worst, tol);
    CHECK(worst <= tol, "max error %.3e above %.1e", worst, tol);
    CU(MemFree(dq)); CU(MemFree(dk)); CU(MemFree(dv)); CU(MemFree(dout)); CU(MemFree(dm));
    CUcontext popped;
    CU(CtxPop(&popped));
    free(q), free(k), free(v), free(hq), free(hk), free(hv), free(ho), free(ref);
}

int main(void) {
    if (!load_driver()) {
        printf("skipped: no CUDA driver or no GPU\n");
        return SKIP;
    }
    CUdevice dev;
    int major, minor;
    CU(DeviceGet(&dev, 0));
    CU(DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    CU(DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    if (!cascade_covers(major, minor, CASCADE_FLOAT16, 64, 0)) {
        printf("skipped: compute capability %d.%d, the cubins are %s\n", major, minor, cascade_architectures());
        return SKIP;
    }
    CHECK(cascade_driver_status() == CASCADE_OK, "%s", cascade_last_error());
    CUcontext ctx;
    CU(PrimaryCtxRetain(&ctx, dev));
    CU(CtxPush(ctx));
    CUstream stream;
    CU(StreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    CUcontext popped;
    CU(CtxPop(&popped));
    for (int dtype = CASCADE_FLOAT16; dtype <= CASCADE_BFLOAT16; dtype++)
        for (int masked = 0; masked <= 1; masked++)
            run_case(dtype, 64, masked, stream, ctx, 1);
    run_case(CASCADE_FLOAT16, 32, 1, stream, ctx, 1);
    run_case(CASCADE_BFLOAT16, 128, 0, stream, ctx, 1);
    run_case(CASCADE_FLOAT16, 64, 0, stream, ctx, 0);
    return 0;
}
