/* Loading the CUDA driver at run time with dlopen("libcuda.so.1").
 *
 * Why dlopen and not linking against libcuda (or against a stub libcuda.so.1 generated at build time with the
 * same soname): a library linked to libcuda.so.1 cannot even be loaded where no driver is installed, unless a
 * stub travels with it on its rpath, and then that stub can shadow the real driver on a GPU machine (rpath is
 * searched before ld.so.cache), turning every launch into a silent failure. With dlopen the library's only
 * link-time dependencies are libc and libdl, the same file works on both kinds of machine, the real driver is
 * always the one the system's loader finds, and "no driver" is an ordinary error code. The price is naming each
 * entry point with its ABI version by hand (cuCtxPushCurrent_v2, ...), which cuda.h's macros otherwise do; the
 * PFN_ typedefs from cudaTypedefs.h keep the signatures checked by the compiler.
 *
 * CASCADE_KERNELS_LIBCUDA=/path/to/libcuda.so.1 loads that file instead (the ctest and pytest "no driver" tests
 * point it at a missing file, so the no-driver path is tested on GPU machines too).
 */
#include "driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static cascade_driver driver;
static const cascade_driver *loaded;
static char load_error[512];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int resolve(void *lib, void **slot, const char *symbol, int required) {
    *slot = dlsym(lib, symbol);
    if (!*slot && required) {
        snprintf(load_error, sizeof load_error, "the CUDA driver has no %s (driver too old?)", symbol);
        return 0;
    }
    return 1;
}

static void load(void) {
    const char *path = getenv("CASCADE_KERNELS_LIBCUDA");
    if (!path || !*path)
        path = "libcuda.so.1"; /* the driver's soname: what the system's loader resolves on a GPU machine */
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* never closed: handles outlive any caller */
    if (!lib) {
        const char *err = dlerror();
        snprintf(load_error, sizeof load_error, "cannot load %s (%s)", path, err ? err : "?");
        return;
    }
    int ok = resolve(lib, (void **)&driver.Init, "cuInit", 1) &&
             resolve(lib, (void **)&driver.GetErrorName, "cuGetErrorName", 1) &&
             resolve(lib, (void **)&driver.CtxGetCurrent, "cuCtxGetCurrent", 1) &&
             resolve(lib, (void **)&driver.CtxGetDevice, "cuCtxGetDevice", 1) &&
             resolve(lib, (void **)&driver.CtxPushCurrent, "cuCtxPushCurrent_v2", 1) &&
             resolve(lib, (void **)&driver.CtxPopCurrent, "cuCtxPopCurrent_v2", 1) &&
             resolve(lib, (void **)&driver.CtxGetId, "cuCtxGetId", 0) &&
             resolve(lib, (void **)&driver.DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", 1) &&
             resolve(lib, (void **)&driver.DeviceGetAttribute, "cuDeviceGetAttribute", 1) &&
             resolve(lib, (void **)&driver.PointerGetAttribute, "cuPointerGetAttribute", 1) &&
             resolve(lib, (void **)&driver.ModuleLoadData, "cuModuleLoadData", 1) &&
             resolve(lib, (void **)&driver.ModuleGetFunction, "cuModuleGetFunction", 1) &&
             resolve(lib, (void **)&driver.FuncSetAttribute, "cuFuncSetAttribute", 1) &&
             /* the unsuffixed symbol: legacy default-stream semantics, as torch's default stream expects */
             resolve(lib, (void **)&driver.LaunchKernel, "cuLaunchKernel", 1);
    if (!ok)
        return;
    CUresult r = driver.Init(0);
    if (r != CUDA_SUCCESS) { /* e.g. CUDA_ERROR_NO_DEVICE: a driver but no GPU, or a stub libcuda */
        const char *name = "?";
        driver.GetErrorName(r, &name);
        snprintf(load_error, sizeof load_error, "cuInit failed with %s (%d): a driver but no usable GPU?", name,
                 (int)r);
        return;
    }
    loaded = &driver;
}

const cascade_driver *cascade_driver_get(const char **why) {
    pthread_once(&once, load);
    if (!loaded && why)
        *why = load_error;
    return loaded;
}
