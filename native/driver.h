/* The CUDA driver API, loaded at run time (see driver.c for why). Internal. */
#ifndef CASCADE_KERNELS_DRIVER_H
#define CASCADE_KERNELS_DRIVER_H

#include <cuda.h>
#include <cudaTypedefs.h>

/* The entry points the library calls, each with the ABI version its symbol name carries in libcuda. */
typedef struct {
    PFN_cuInit_v2000 Init;
    PFN_cuGetErrorName_v6000 GetErrorName;
    PFN_cuCtxGetCurrent_v4000 CtxGetCurrent;
    PFN_cuCtxGetDevice_v2000 CtxGetDevice;
    PFN_cuCtxPushCurrent_v4000 CtxPushCurrent;
    PFN_cuCtxPopCurrent_v4000 CtxPopCurrent;
    PFN_cuCtxGetId_v12000 CtxGetId; /* may be NULL: drivers before 12.0 */
    PFN_cuDevicePrimaryCtxRetain_v7000 DevicePrimaryCtxRetain;
    PFN_cuDeviceGetAttribute_v2000 DeviceGetAttribute;
    PFN_cuPointerGetAttribute_v4000 PointerGetAttribute;
    PFN_cuModuleLoadData_v2000 ModuleLoadData;
    PFN_cuModuleGetFunction_v2000 ModuleGetFunction;
    PFN_cuFuncSetAttribute_v9000 FuncSetAttribute;
    PFN_cuLaunchKernel_v4000 LaunchKernel;
} cascade_driver;

/* The loaded driver, or NULL with *why set (a static string or this thread's message buffer). Loads once. */
const cascade_driver *cascade_driver_get(const char **why);

#endif
