/*
 * A fake libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * Built against the real nvml.h (PyPI nvidia-nvml-dev) so that the real
 * binding (nvidia-ml-py) loads it unchanged through LD_LIBRARY_PATH. Its
 * state comes from the text file named by $HPR_FAKE_NVML_STATE and is
 * re-read whenever that file changes, so a test can break a GPU while a
 * process keeps running. The format is documented in README.md.
 */
#include <nvml.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MAX_GPUS 64
#define MAX_EVENTS 4096
#define MAX_OVERRIDES 64
#define N_LINK_COUNTERS 5 /* NVML_NVLINK_ERROR_DL_REPLAY .. NVML_NVLINK_ERROR_DL_ECC_DATA */
#define ALL_GPUS (-1)
/* The event types the fake can deliver; a GPU supports all of them unless its
 * state says otherwise (gpu.I.event_types), which models older GPUs/drivers. */
#define FAKE_EVENT_TYPES ((unsigned long long)(nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError))

struct nvmlDevice_st {
    unsigned int index;
};

struct nvmlEventSet_st {
    unsigned long long registered[MAX_GPUS]; /* event type mask per GPU */
    unsigned long long last_seq;             /* events are delivered once each, in sequence order */
};

typedef struct {
    int active;
    unsigned long long counters[N_LINK_COUNTERS];
} fake_link;

typedef struct {
    int lost;
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    unsigned int domain, bus, device;
    unsigned long long ecc[2][2]; /* [nvmlMemoryErrorType_t][nvmlEccCounterType_t] */
    unsigned int remap_correctable, remap_uncorrectable, remap_pending, remap_failure;
    unsigned int retired_pending;
    unsigned long long throttle;
    unsigned int recovery_action;
    int nvlinks; /* -1: the node-wide default */
    unsigned long long event_types; /* nvmlDeviceGetSupportedEventTypes; registering others is NOT_SUPPORTED */
    fake_link links[NVML_NVLINK_MAX_LINKS];
} fake_gpu;

typedef struct {
    unsigned long long seq;
    unsigned int gpu;
    unsigned long long type; /* nvmlEventType* */
    unsigned long long data; /* nvmlEventData_t.eventData: the XID, 0 for other types (as NVML documents) */
} fake_event;

typedef struct {
    char func[64];
    int gpu; /* ALL_GPUS or an index */
    nvmlReturn_t code;
} fake_override;

typedef struct {
    unsigned int gpus;
    int nvlinks;
    double hang_seconds;
    char driver_version[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
    char nvml_version[NVML_SYSTEM_NVML_VERSION_BUFFER_SIZE];
    fake_gpu gpu[MAX_GPUS];
    fake_event events[MAX_EVENTS];
    unsigned int n_events;
    fake_override overrides[MAX_OVERRIDES];
    unsigned int n_overrides;
} fake_state;

typedef struct {
    int exists;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
} file_sig;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static fake_state S;
static int loaded;
static file_sig loaded_sig;
static int init_refcount;
static struct nvmlDevice_st devices[MAX_GPUS];

/* Bus numbers of an AWS p5.48xlarge (8x H100), so the HyperPod workshop's XID
 * line ("NVRM: Xid (PCI:0000:b9:00): 74, ...") names a real GPU here: GPU 6. */
static const unsigned int default_bus[8] = {0x53, 0x64, 0x75, 0x86, 0x97, 0xa8, 0xb9, 0xca};

static void set_defaults(void)
{
    memset(&S, 0, sizeof S);
    S.gpus = 8;
    S.nvlinks = 18;
    snprintf(S.driver_version, sizeof S.driver_version, "580.95.05");
    snprintf(S.nvml_version, sizeof S.nvml_version, "13.580.95.05");
    for (unsigned int i = 0; i < MAX_GPUS; i++) {
        fake_gpu *g = &S.gpu[i];
        snprintf(g->uuid, sizeof g->uuid, "GPU-fa4e0000-0000-4000-8000-%012x", i);
        snprintf(g->name, sizeof g->name, "NVIDIA H100 80GB HBM3");
        g->bus = default_bus[i % 8];
        g->device = i / 8;
        g->nvlinks = -1;
        g->event_types = FAKE_EVENT_TYPES;
        for (unsigned int l = 0; l < NVML_NVLINK_MAX_LINKS; l++)
            g->links[l].active = 1;
    }
}

static void warn(const char *what, const char *key)
{
    fprintf(stderr, "fake_nvml: %s: %s\n", what, key);
}

static unsigned long long num(const char *value)
{
    return strtoull(value, NULL, 0);
}

/* Accepts "0000:b9:00.0", "00000000:B9:00.0" and "b9:00.0" (domain 0). */
static int parse_pci(const char *value, fake_gpu *g)
{
    unsigned int domain, bus, device;
    if (sscanf(value, "%x:%x:%x", &domain, &bus, &device) != 3) {
        domain = 0;
        if (sscanf(value, "%x:%x", &bus, &device) != 2)
            return -1;
    }
    g->domain = domain;
    g->bus = bus;
    g->device = device;
    return 0;
}

static int link_counter(const char *name)
{
    static const char *names[N_LINK_COUNTERS] = {"replay", "recovery", "crc_flit", "crc_data", "ecc_data"};
    for (int i = 0; i < N_LINK_COUNTERS; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

static void add_override(const char *func, int gpu, const char *value)
{
    if (S.n_overrides == MAX_OVERRIDES) {
        warn("too many error overrides, ignored", func);
        return;
    }
    fake_override *o = &S.overrides[S.n_overrides++];
    snprintf(o->func, sizeof o->func, "%s", func);
    o->gpu = gpu;
    o->code = (nvmlReturn_t)num(value);
}

static int set_link(fake_gpu *g, const char *rest, const char *value)
{
    unsigned int link;
    int used;
    if (sscanf(rest, "%u.%n", &link, &used) != 1 || link >= NVML_NVLINK_MAX_LINKS)
        return -1;
    const char *field = rest + used;
    if (strcmp(field, "state") == 0) {
        g->links[link].active = num(value) != 0;
        return 0;
    }
    int counter = link_counter(field);
    if (counter < 0)
        return -1;
    g->links[link].counters[counter] = num(value);
    return 0;
}

static int set_gpu(const char *rest, const char *value)
{
    unsigned int i;
    int used;
    if (sscanf(rest, "%u.%n", &i, &used) != 1 || i >= MAX_GPUS)
        return -1;
    fake_gpu *g = &S.gpu[i];
    const char *f = rest + used;

    if (strncmp(f, "nvlink.", 7) == 0)
        return set_link(g, f + 7, value);
    if (strncmp(f, "error.", 6) == 0) {
        add_override(f + 6, (int)i, value);
        return 0;
    }
    if (strcmp(f, "lost") == 0) g->lost = num(value) != 0;
    else if (strcmp(f, "uuid") == 0) snprintf(g->uuid, sizeof g->uuid, "%s", value);
    else if (strcmp(f, "name") == 0) snprintf(g->name, sizeof g->name, "%s", value);
    else if (strcmp(f, "pci") == 0) return parse_pci(value, g);
    else if (strcmp(f, "ecc_dbe_volatile") == 0) g->ecc[NVML_MEMORY_ERROR_TYPE_UNCORRECTED][NVML_VOLATILE_ECC] = num(value);
    else if (strcmp(f, "ecc_dbe_aggregate") == 0) g->ecc[NVML_MEMORY_ERROR_TYPE_UNCORRECTED][NVML_AGGREGATE_ECC] = num(value);
    else if (strcmp(f, "ecc_sbe_volatile") == 0) g->ecc[NVML_MEMORY_ERROR_TYPE_CORRECTED][NVML_VOLATILE_ECC] = num(value);
    else if (strcmp(f, "ecc_sbe_aggregate") == 0) g->ecc[NVML_MEMORY_ERROR_TYPE_CORRECTED][NVML_AGGREGATE_ECC] = num(value);
    else if (strcmp(f, "remap_correctable") == 0) g->remap_correctable = (unsigned int)num(value);
    else if (strcmp(f, "remap_uncorrectable") == 0) g->remap_uncorrectable = (unsigned int)num(value);
    else if (strcmp(f, "remap_pending") == 0) g->remap_pending = num(value) != 0;
    else if (strcmp(f, "remap_failure") == 0) g->remap_failure = num(value) != 0;
    else if (strcmp(f, "retired_pending") == 0) g->retired_pending = num(value) != 0;
    else if (strcmp(f, "throttle") == 0) g->throttle = num(value);
    else if (strcmp(f, "recovery_action") == 0) g->recovery_action = (unsigned int)num(value);
    else if (strcmp(f, "nvlinks") == 0) g->nvlinks = (int)num(value);
    else if (strcmp(f, "event_types") == 0) g->event_types = num(value) & FAKE_EVENT_TYPES;
    else return -1;
    return 0;
}

/* "I,N" or "I,xid:N": XID N on GPU I; "I,dbe": a double-bit ECC error on GPU I. */
static int set_event(const char *rest, const char *value)
{
    fake_event e;
    int used = 0;
    if (S.n_events == MAX_EVENTS)
        return -1;
    e.seq = num(rest);
    if (sscanf(value, "%u,%n", &e.gpu, &used) != 1 || used == 0)
        return -1;
    const char *what = value + used;
    char *end;
    if (strcmp(what, "dbe") == 0) {
        e.type = nvmlEventTypeDoubleBitEccError;
        e.data = 0;
    } else {
        if (strncmp(what, "xid:", 4) == 0)
            what += 4;
        e.data = strtoull(what, &end, 0);
        if (end == what || *end != '\0')
            return -1;
        e.type = nvmlEventTypeXidCriticalError;
    }
    S.events[S.n_events++] = e;
    return 0;
}

static int set_key(const char *key, const char *value)
{
    if (strncmp(key, "gpu.", 4) == 0) return set_gpu(key + 4, value);
    if (strncmp(key, "event.", 6) == 0) return set_event(key + 6, value);
    if (strncmp(key, "error.", 6) == 0) {
        add_override(key + 6, ALL_GPUS, value);
        return 0;
    }
    if (strcmp(key, "gpus") == 0) {
        S.gpus = (unsigned int)num(value);
        if (S.gpus > MAX_GPUS) S.gpus = MAX_GPUS;
    }
    else if (strcmp(key, "nvlinks") == 0) S.nvlinks = (int)num(value);
    else if (strcmp(key, "hang_seconds") == 0) S.hang_seconds = strtod(value, NULL);
    else if (strcmp(key, "driver_version") == 0) snprintf(S.driver_version, sizeof S.driver_version, "%s", value);
    else if (strcmp(key, "nvml_version") == 0) snprintf(S.nvml_version, sizeof S.nvml_version, "%s", value);
    else return -1;
    return 0;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t') s++;
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r')) end--;
    *end = '\0';
    return s;
}

static void parse_file(FILE *f)
{
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            warn("line without '=', ignored", s);
            continue;
        }
        *eq = '\0';
        char *key = trim(s);
        if (set_key(key, trim(eq + 1)) != 0)
            warn("unknown key or bad value, ignored", key);
    }
}

static file_sig current_sig(const char *path)
{
    file_sig sig;
    struct stat st;
    memset(&sig, 0, sizeof sig);
    if (path && stat(path, &st) == 0) {
        sig.exists = 1;
        sig.dev = st.st_dev;
        sig.ino = st.st_ino;
        sig.size = st.st_size;
        sig.mtime = st.st_mtim;
    }
    return sig;
}

/* Re-read the state file when it was created, replaced, removed or modified. */
static void reload_locked(void)
{
    const char *path = getenv("HPR_FAKE_NVML_STATE");
    file_sig sig = current_sig(path);
    if (loaded && memcmp(&sig, &loaded_sig, sizeof sig) == 0)
        return;
    set_defaults();
    if (sig.exists) {
        FILE *f = fopen(path, "r");
        if (f) {
            parse_file(f);
            fclose(f);
        }
    }
    loaded_sig = sig;
    loaded = 1;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_seconds(double seconds)
{
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static nvmlReturn_t override_locked(const char *func, int gpu)
{
    for (unsigned int i = 0; i < S.n_overrides; i++) {
        const fake_override *o = &S.overrides[i];
        if (strcmp(o->func, func) == 0 && (o->gpu == ALL_GPUS || o->gpu == gpu))
            return o->code;
    }
    return NVML_SUCCESS;
}

/*
 * $HPR_FAKE_NVML_CALL_LOG names a file that gets one line "<function> <GPU index, -1 for none>"
 * per call, flushed at once, so a test can count the calls a pass makes.
 */
static void log_call_locked(const char *func, int gpu)
{
    static FILE *out;
    static int opened;
    if (!opened) {
        const char *path = getenv("HPR_FAKE_NVML_CALL_LOG");
        out = path && *path ? fopen(path, "a") : NULL;
        opened = 1;
    }
    if (out) {
        fprintf(out, "%s %d\n", func, gpu);
        fflush(out);
    }
}

/*
 * Every entry point starts here: reload the state, hang if asked to (outside
 * the lock, so other threads are not blocked by it) and apply error overrides.
 * Returns with the lock held; callers finish with leave().
 */
static nvmlReturn_t enter(const char *func, int gpu, int needs_init)
{
    pthread_mutex_lock(&lock);
    log_call_locked(func, gpu);
    reload_locked();
    double hang = S.hang_seconds;
    if (hang > 0) {
        pthread_mutex_unlock(&lock);
        sleep_seconds(hang);
        pthread_mutex_lock(&lock);
        reload_locked();
    }
    if (needs_init && init_refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    return override_locked(func, gpu);
}

static nvmlReturn_t leave(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Like enter() for calls on a device handle: a lost GPU answers GPU_IS_LOST to everything. */
static nvmlReturn_t enter_device(const char *func, nvmlDevice_t device, fake_gpu **g)
{
    uintptr_t offset = (uintptr_t)device - (uintptr_t)devices;
    int index = offset < sizeof devices && offset % sizeof devices[0] == 0 ? (int)(offset / sizeof devices[0]) : -1;
    nvmlReturn_t rc = enter(func, index, 1);
    if (rc != NVML_SUCCESS)
        return rc;
    if (index < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((unsigned int)index >= S.gpus || S.gpu[index].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *g = &S.gpu[index];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    if (!dst)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

static int gpu_nvlinks(const fake_gpu *g)
{
    return g->nvlinks >= 0 ? g->nvlinks : S.nvlinks;
}

/* ---- library ---------------------------------------------------------------------------- */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    nvmlReturn_t rc = enter("nvmlInitWithFlags", ALL_GPUS, 0);
    if (rc == NVML_SUCCESS && S.gpus == 0 && !(flags & NVML_INIT_FLAG_NO_GPUS))
        rc = NVML_ERROR_GPU_NOT_FOUND;
    if (rc == NVML_SUCCESS) {
        for (unsigned int i = 0; i < MAX_GPUS; i++)
            devices[i].index = i;
        init_refcount++;
    }
    return leave(rc);
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t rc = enter("nvmlShutdown", ALL_GPUS, 1);
    if (rc == NVML_SUCCESS)
        init_refcount--;
    return leave(rc);
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter("nvmlSystemGetDriverVersion", ALL_GPUS, 1);
    if (rc == NVML_SUCCESS)
        rc = copy_string(version, length, S.driver_version);
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter("nvmlSystemGetNVMLVersion", ALL_GPUS, 0);
    if (rc == NVML_SUCCESS)
        rc = copy_string(version, length, S.nvml_version);
    return leave(rc);
}

/* ---- devices ---------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t rc = enter("nvmlDeviceGetCount_v2", ALL_GPUS, 1);
    if (rc == NVML_SUCCESS) {
        if (deviceCount)
            *deviceCount = S.gpus;
        else
            rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter("nvmlDeviceGetHandleByIndex_v2", index < MAX_GPUS ? (int)index : ALL_GPUS, 1);
    if (rc == NVML_SUCCESS) {
        if (!device || index >= S.gpus)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *device = &devices[index];
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetIndex", device, &g);
    if (rc == NVML_SUCCESS)
        *index = device->index;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetUUID", device, &g);
    if (rc == NVML_SUCCESS)
        rc = copy_string(uuid, length, g->uuid);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetName", device, &g);
    if (rc == NVML_SUCCESS)
        rc = copy_string(name, length, g->name);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetPciInfo_v3", device, &g);
    if (rc == NVML_SUCCESS) {
        memset(pci, 0, sizeof *pci);
        pci->domain = g->domain;
        pci->bus = g->bus;
        pci->device = g->device;
        pci->pciDeviceId = 0x233010de; /* H100 SXM5: device 0x2330, vendor 0x10de */
        pci->pciSubSystemId = 0x16c110de;
        snprintf(pci->busId, sizeof pci->busId, NVML_DEVICE_PCI_BUS_ID_FMT, g->domain, g->bus, g->device);
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT,
                 g->domain & 0xffff, g->bus, g->device);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType, unsigned long long *eccCounts)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetTotalEccErrors", device, &g);
    if (rc == NVML_SUCCESS) {
        if ((unsigned int)errorType > 1 || (unsigned int)counterType > 1 || !eccCounts)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *eccCounts = g->ecc[errorType][counterType];
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows, unsigned int *uncRows,
                                       unsigned int *isPending, unsigned int *failureOccurred)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetRemappedRows", device, &g);
    if (rc == NVML_SUCCESS) {
        *corrRows = g->remap_correctable;
        *uncRows = g->remap_uncorrectable;
        *isPending = g->remap_pending;
        *failureOccurred = g->remap_failure;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, nvmlEnableState_t *isPending)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetRetiredPagesPendingStatus", device, &g);
    if (rc == NVML_SUCCESS)
        *isPending = g->retired_pending ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return leave(rc);
}

/* A PCIe GPU (nvlinks=0) answers NOT_SUPPORTED, as the real library does. */
static nvmlReturn_t check_link(const fake_gpu *g, unsigned int link)
{
    if (link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (link >= (unsigned int)gpu_nvlinks(g))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, nvmlEnableState_t *isActive)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetNvLinkState", device, &g);
    if (rc == NVML_SUCCESS)
        rc = check_link(g, link);
    if (rc == NVML_SUCCESS)
        *isActive = g->links[link].active ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link,
                                             nvmlNvLinkErrorCounter_t counter, unsigned long long *counterValue)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetNvLinkErrorCounter", device, &g);
    if (rc == NVML_SUCCESS)
        rc = check_link(g, link);
    if (rc == NVML_SUCCESS) {
        if ((unsigned int)counter >= N_LINK_COUNTERS)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *counterValue = g->links[link].counters[counter];
    }
    return leave(rc);
}

static nvmlReturn_t clocks_event_reasons(const char *func, nvmlDevice_t device, unsigned long long *reasons)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device(func, device, &g);
    if (rc == NVML_SUCCESS)
        *reasons = g->throttle;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *clocksEventReasons)
{
    return clocks_event_reasons("nvmlDeviceGetCurrentClocksEventReasons", device, clocksEventReasons);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *clocksThrottleReasons)
{
    return clocks_event_reasons("nvmlDeviceGetCurrentClocksThrottleReasons", device, clocksThrottleReasons);
}

/* Only the GPU recovery action is modelled; other fields say NOT_SUPPORTED in their own slot. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount, nvmlFieldValue_t *values)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetFieldValues", device, &g);
    if (rc == NVML_SUCCESS && (valuesCount < 0 || !values))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        for (int i = 0; i < valuesCount; i++) {
            nvmlFieldValue_t *v = &values[i];
            v->timestamp = (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
            v->latencyUsec = 0;
#ifdef NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
            if (v->fieldId == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) {
                v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
                v->value.uiVal = g->recovery_action;
                v->nvmlReturn = NVML_SUCCESS;
                continue;
            }
#endif
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return leave(rc);
}

/* ---- events ----------------------------------------------------------------------------- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t rc = enter("nvmlEventSetCreate", ALL_GPUS, 1);
    if (rc == NVML_SUCCESS) {
        *set = calloc(1, sizeof **set);
        if (!*set)
            rc = NVML_ERROR_MEMORY;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceGetSupportedEventTypes", device, &g);
    if (rc == NVML_SUCCESS)
        *eventTypes = g->event_types;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set)
{
    fake_gpu *g;
    nvmlReturn_t rc = enter_device("nvmlDeviceRegisterEvents", device, &g);
    if (rc == NVML_SUCCESS && !set)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    /* Like NVML: one unsupported type in the mask fails the whole registration. */
    if (rc == NVML_SUCCESS && (eventTypes & ~g->event_types))
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS)
        set->registered[device->index] |= eventTypes;
    return leave(rc);
}

static const fake_event *next_event_locked(const struct nvmlEventSet_st *set)
{
    const fake_event *best = NULL;
    for (unsigned int i = 0; i < S.n_events; i++) {
        const fake_event *e = &S.events[i];
        if (e->seq <= set->last_seq || e->gpu >= S.gpus)
            continue;
        if (!(set->registered[e->gpu] & e->type))
            continue; /* not registered for this type on this GPU: never delivered to this set */
        if (!best || e->seq < best->seq)
            best = e;
    }
    return best;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    nvmlReturn_t rc = enter("nvmlEventSetWait_v2", ALL_GPUS, 1);
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (!set || !data)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    double deadline = now_seconds() + timeoutms / 1000.0;
    for (;;) {
        const fake_event *e = next_event_locked(set);
        if (e) {
            memset(data, 0, sizeof *data);
            data->device = &devices[e->gpu];
            data->eventType = e->type;
            data->eventData = e->data;
            data->gpuInstanceId = 0xFFFFFFFF;
            data->computeInstanceId = 0xFFFFFFFF;
            set->last_seq = e->seq;
            return leave(NVML_SUCCESS);
        }
        if (now_seconds() >= deadline)
            return leave(NVML_ERROR_TIMEOUT);
        pthread_mutex_unlock(&lock);
        sleep_seconds(0.01);
        pthread_mutex_lock(&lock);
        reload_locked();
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    nvmlReturn_t rc = enter("nvmlEventSetFree", ALL_GPUS, 1);
    if (rc == NVML_SUCCESS)
        free(set);
    return leave(rc);
}
