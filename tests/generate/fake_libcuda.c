/* An emulation, over host memory, of the CUDA driver calls moec's GPU expert tier makes
 * (moec/runtime/cuda_driver.py), so that the tier's logic runs on a machine without a GPU.
 *
 * "Device" addresses are host addresses: a reserved range is host address space in which
 * every granule not mapped reads as poison (0xFF bytes: NaN in every float format), so a
 * kernel that reads an expert the cache did not load computes NaN instead of silently right
 * numbers. A physical allocation is a memfd; mapping it is mmap(MAP_FIXED) of the memfd at
 * the address, readable once cuMemSetAccess grants access, as on a GPU.
 *
 * Each call checks the preconditions the CUDA documentation states and returns the driver's
 * error code when one is broken: sizes and addresses multiples of the granularity, mapping
 * only into a reserved range and only over unmapped granules, whole allocations unmapped,
 * access granted only to mapped memory, copies only into mapped and accessible memory, a
 * current context in the calling thread, allocation properties as required. fake_* report
 * the device memory held, for the tests' budget checks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3,
       INVALID_DEVICE = 101, INVALID_CONTEXT = 201, INVALID_HANDLE = 400,
       ILLEGAL_ADDRESS = 700 };

typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type; int requestedHandleTypes; CUmemLocation location; void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage;
             unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

typedef struct { uintptr_t base; size_t size; unsigned char *state; size_t *owner; } Reservation;
/* per granule: state 0 unmapped (poison), 1 mapped without access, 2 mapped read-write; owner
   the handle mapped there */
typedef struct { int fd; size_t size; int mapped; } Handle;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static size_t gran;
static int poison_fd = -1;
static Reservation res[4096];
static int nres;
static Handle *handles;
static size_t nhandles, caphandles;
static size_t live, peak, mapped_bytes, peak_mapped, host_bytes;
static long syncs;
static __thread void *current;
static char the_ctx;

#define NEED_CTX() do { if (!initialized) return NOT_INITIALIZED; \
                        if (!current) return INVALID_CONTEXT; } while (0)

static int poison_at(uintptr_t at, size_t size) {
    for (size_t off = 0; off < size; off += gran)
        if (mmap((void *)(at + off), gran, PROT_READ, MAP_SHARED | MAP_FIXED, poison_fd, 0)
            == MAP_FAILED) return -1;
    return 0;
}

static Reservation *find(uintptr_t p, size_t n) {
    for (int i = 0; i < nres; i++)
        if (res[i].size && p >= res[i].base && p + n <= res[i].base + res[i].size)
            return &res[i];
    return NULL;
}

CUresult cuInit(unsigned flags) {
    if (flags) return INVALID_VALUE;
    pthread_mutex_lock(&mu);
    if (!initialized) {
        const char *g = getenv("FAKE_CUDA_GRANULARITY");
        gran = g ? strtoull(g, NULL, 10) : 65536;
        poison_fd = memfd_create("fake_cuda_poison", 0);
        if (poison_fd < 0 || ftruncate(poison_fd, gran)) { pthread_mutex_unlock(&mu); return 2; }
        unsigned char *p = mmap(NULL, gran, PROT_WRITE, MAP_SHARED, poison_fd, 0);
        memset(p, 0xFF, gran);
        munmap(p, gran);
        initialized = 1;
    }
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuGetErrorString(CUresult rc, const char **s) {
    switch (rc) {
    case INVALID_VALUE: *s = "invalid argument"; break;
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case NOT_INITIALIZED: *s = "initialization error"; break;
    case INVALID_DEVICE: *s = "invalid device ordinal"; break;
    case INVALID_CONTEXT: *s = "invalid device context"; break;
    case INVALID_HANDLE: *s = "invalid resource handle"; break;
    case ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; break;
    default: *s = "unknown error";
    }
    return OK;
}

CUresult cuDeviceGet(int *dev, int ordinal) {
    if (!initialized) return NOT_INITIALIZED;
    if (ordinal != 0) return INVALID_DEVICE;
    *dev = 0;
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    if (!initialized) return NOT_INITIALIZED;
    if (dev != 0) return INVALID_DEVICE;
    *ctx = &the_ctx;
    return OK;
}

CUresult cuCtxSetCurrent(void *ctx) {
    if (!initialized) return NOT_INITIALIZED;
    if (ctx && ctx != &the_ctx) return INVALID_CONTEXT;
    current = ctx;
    return OK;
}

CUresult cuCtxSynchronize(void) {
    NEED_CTX();
    __atomic_add_fetch(&syncs, 1, __ATOMIC_SEQ_CST);
    return OK;
}

static int prop_ok(const CUmemAllocationProp *p) {
    return p && p->type == 1 && p->requestedHandleTypes == 0 && p->location.type == 1 &&
           p->location.id == 0 && p->win32HandleMetaData == NULL;
}

CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, int option) {
    NEED_CTX();
    if (!prop_ok(p) || (option != 0 && option != 1)) return INVALID_VALUE;
    *g = gran;
    return OK;
}

CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    NEED_CTX();
    const char *t = getenv("FAKE_CUDA_TOTAL");
    *total = t ? strtoull(t, NULL, 10) : ((size_t)1 << 34);
    *free_b = *total > live ? *total - live : 0;
    return OK;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t align, CUdeviceptr addr,
                             unsigned long long flags) {
    NEED_CTX();
    if (!size || size % gran || addr || flags || (align & (align - 1))) return INVALID_VALUE;
    if (align < gran) align = gran;
    pthread_mutex_lock(&mu);
    CUresult rc = OUT_OF_MEMORY;
    int slot = -1;
    for (int i = 0; i < nres; i++) if (!res[i].size) { slot = i; break; }
    if (slot < 0 && nres < 4096) slot = nres++;
    if (slot >= 0) {
        unsigned char *raw = mmap(NULL, size + align, PROT_NONE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (raw != MAP_FAILED) {
            uintptr_t base = ((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1);
            if (base > (uintptr_t)raw) munmap(raw, base - (uintptr_t)raw);
            uintptr_t end = (uintptr_t)raw + size + align;
            if (end > base + size) munmap((void *)(base + size), end - base - size);
            if (poison_at(base, size) == 0) {
                res[slot].base = base;
                res[slot].size = size;
                res[slot].state = calloc(size / gran, 1);
                res[slot].owner = calloc(size / gran, sizeof(size_t));
                *ptr = base;
                rc = OK;
            }
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    NEED_CTX();
    pthread_mutex_lock(&mu);
    CUresult rc = INVALID_VALUE;
    for (int i = 0; i < nres; i++) {
        if (res[i].size && res[i].base == ptr && res[i].size == size) {
            int busy = 0;
            for (size_t g = 0; g < size / gran; g++) busy |= res[i].state[g];
            if (!busy) {
                munmap((void *)ptr, size);
                free(res[i].state);
                free(res[i].owner);
                res[i].size = 0;
                rc = OK;
            }
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size,
                     const CUmemAllocationProp *p, unsigned long long flags) {
    NEED_CTX();
    if (!size || size % gran || flags || !prop_ok(p)) return INVALID_VALUE;
    int fd = memfd_create("fake_cuda_granule", 0);
    if (fd < 0 || ftruncate(fd, size)) return OUT_OF_MEMORY;
    pthread_mutex_lock(&mu);
    if (nhandles == caphandles) {
        caphandles = caphandles ? 2 * caphandles : 256;
        handles = realloc(handles, caphandles * sizeof(Handle));
    }
    handles[nhandles] = (Handle){fd, size, 0};
    *h = ++nhandles;
    live += size;
    if (live > peak) peak = live;
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    NEED_CTX();
    pthread_mutex_lock(&mu);
    CUresult rc = INVALID_HANDLE;
    if (h >= 1 && h <= nhandles && handles[h - 1].fd >= 0 && !handles[h - 1].mapped) {
        close(handles[h - 1].fd);
        handles[h - 1].fd = -1;
        live -= handles[h - 1].size;
        rc = OK;
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                  unsigned long long flags) {
    NEED_CTX();
    if (offset || flags || ptr % gran || !size || size % gran) return INVALID_VALUE;
    pthread_mutex_lock(&mu);
    CUresult rc = INVALID_VALUE;
    Reservation *r = find(ptr, size);
    if (h < 1 || h > nhandles || handles[h - 1].fd < 0) rc = INVALID_HANDLE;
    else if (r && handles[h - 1].size == size && !handles[h - 1].mapped) {
        size_t g0 = (ptr - r->base) / gran, n = size / gran, busy = 0;
        for (size_t g = g0; g < g0 + n; g++) busy |= r->state[g];
        if (!busy && mmap((void *)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED,
                          handles[h - 1].fd, 0) != MAP_FAILED) {
            for (size_t g = g0; g < g0 + n; g++) { r->state[g] = 1; r->owner[g] = h; }
            handles[h - 1].mapped = 1;
            mapped_bytes += size;
            if (mapped_bytes > peak_mapped) peak_mapped = mapped_bytes;
            rc = OK;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *d, size_t count) {
    NEED_CTX();
    if (count != 1 || !d || d->location.type != 1 || d->location.id != 0 || d->flags != 3 ||
        ptr % gran || !size || size % gran) return INVALID_VALUE;
    pthread_mutex_lock(&mu);
    CUresult rc = INVALID_VALUE;
    Reservation *r = find(ptr, size);
    if (r) {
        size_t g0 = (ptr - r->base) / gran, n = size / gran, all = 1;
        for (size_t g = g0; g < g0 + n; g++) all &= r->state[g] != 0;
        if (all && mprotect((void *)ptr, size, PROT_READ | PROT_WRITE) == 0) {
            for (size_t g = g0; g < g0 + n; g++) r->state[g] = 2;
            rc = OK;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    NEED_CTX();
    if (ptr % gran || !size || size % gran) return INVALID_VALUE;
    pthread_mutex_lock(&mu);
    CUresult rc = INVALID_VALUE;
    Reservation *r = find(ptr, size);
    if (r) {
        /* the range must be exactly one mapped allocation (moec unmaps what it mapped) */
        size_t g0 = (ptr - r->base) / gran, n = size / gran, h = r->owner[g0], all = h != 0;
        for (size_t g = g0; g < g0 + n; g++) all &= r->state[g] != 0 && r->owner[g] == h;
        if (all && handles[h - 1].size == size && (g0 == 0 || r->owner[g0 - 1] != h) &&
            poison_at(ptr, size) == 0) {
            for (size_t g = g0; g < g0 + n; g++) { r->state[g] = 0; r->owner[g] = 0; }
            handles[h - 1].mapped = 0;
            mapped_bytes -= size;
            rc = OK;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) {
    NEED_CTX();
    if (flags) return INVALID_VALUE;
    if (posix_memalign(pp, 4096, size ? size : 1)) return OUT_OF_MEMORY;
    __atomic_add_fetch(&host_bytes, size, __ATOMIC_SEQ_CST);
    return OK;
}

CUresult cuMemFreeHost(void *p) {
    NEED_CTX();
    free(p);
    return OK;
}

CUresult cuStreamCreate(void **s, unsigned flags) {
    NEED_CTX();
    if (flags > 1) return INVALID_VALUE;
    *s = malloc(1);
    return OK;
}

CUresult cuStreamSynchronize(void *s) {
    NEED_CTX();
    return s ? OK : INVALID_HANDLE;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
    NEED_CTX();
    if (!s) return INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    Reservation *r = find(dst, n);
    int ok = r != NULL;
    if (ok)
        for (size_t g = (dst - r->base) / gran; g * gran < dst - r->base + n; g++)
            ok &= r->state[g] == 2;
    pthread_mutex_unlock(&mu);
    if (!ok) return ILLEGAL_ADDRESS;
    memcpy((void *)dst, src, n);
    return OK;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    NEED_CTX();
    pthread_mutex_lock(&mu);
    Reservation *r = find(src, n);
    int ok = r != NULL;
    if (ok)
        for (size_t g = (src - r->base) / gran; g * gran < src - r->base + n; g++)
            ok &= r->state[g] == 2;
    pthread_mutex_unlock(&mu);
    if (!ok) return ILLEGAL_ADDRESS;
    memcpy(dst, (const void *)src, n);
    return OK;
}

/* for the tests: the granularity (before any reservation or allocation; default 64 KiB or
   $FAKE_CUDA_GRANULARITY) and what the "device" holds */
int fake_set_granularity(size_t g) {
    int busy = live != 0;
    for (int i = 0; i < nres; i++) busy |= res[i].size != 0;
    if (busy || !g || g % 4096) return 1;
    if (!initialized && cuInit(0)) return 1;
    pthread_mutex_lock(&mu);
    gran = g;
    int rc = ftruncate(poison_fd, gran);
    unsigned char *p = mmap(NULL, gran, PROT_WRITE, MAP_SHARED, poison_fd, 0);
    if (p != MAP_FAILED) { memset(p, 0xFF, gran); munmap(p, gran); }
    pthread_mutex_unlock(&mu);
    return rc != 0 || p == MAP_FAILED;
}
void fake_reset_peaks(void) { peak = live; peak_mapped = mapped_bytes; }

size_t fake_live_bytes(void) { return live; }
size_t fake_peak_bytes(void) { return peak; }
size_t fake_mapped_bytes(void) { return mapped_bytes; }
size_t fake_peak_mapped_bytes(void) { return peak_mapped; }
size_t fake_host_bytes(void) { return host_bytes; }
long fake_syncs(void) { return syncs; }
