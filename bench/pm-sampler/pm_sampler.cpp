// pm_sampler: device-wide hardware-counter time series of an NVIDIA GPU while a command runs.
//
// Nsight Compute profiles CUDA kernels only, so the wgpu (Vulkan) kernels of this project have
// no counter profile there. CUPTI's PM sampling API (CUDA 12.6+) samples the GPU's performance
// monitors at a fixed interval, for the device and not for one CUDA launch, which is what
// Nsight Systems' "GPU metrics" shows. This tool drives that API around an arbitrary command:
//
//   pm_sampler [options] --out FILE.csv -- COMMAND ARGS...
//   pm_sampler [options] --out FILE.csv --duration-s S      (no command: sample for S seconds)
//   pm_sampler --list [--list-submetrics]                    (device, chip, PM-sampling metrics)
//
// Sequence of a run: the command is forked first and waits on a pipe (so it inherits no CUDA
// state); the tool then initialises CUDA (primary context of the device) and CUPTI, validates the
// metrics, builds the single-pass config image, enables and starts PM sampling, and releases the
// command to exec. While the command runs, the hardware buffer is decoded every --decode-ms into a
// counter data image; newly completed samples are evaluated and appended to the CSV, and a full
// image is reset and decoding continues. When the command exits, sampling stops, the rest of the
// hardware buffer is decoded, and a summary (samples, gaps, overflow) goes to stderr.
//
// CSV: `sample_start_ns,sample_end_ns,<metric>,...`, one row per sample. The timestamps are the
// ones CUPTI reports for PM samples (its documentation calls them CPU-based); the clocks printed
// at the start and at the end of a run relate them to CLOCK_REALTIME and CLOCK_MONOTONIC.
//
// Every CUDA and CUPTI call is checked; a failure prints the call, the result's name and
// CUPTI's message, stops the command (SIGTERM) if it runs, and exits with status 2. Otherwise
// the exit status is the command's (128 + signal if a signal ended it).
//
// Built against the CUPTI headers of CUDA 13.0 (CUPTI_API_VERSION 130001); see build.sh.

#include <cuda.h>
#include <cupti_activity.h>  // cuptiGetTimestamp
#include <cupti_pmsampling.h>
#include <cupti_profiler_host.h>
#include <cupti_profiler_target.h>
#include <cupti_result.h>
#include <cupti_target.h>
#include <cupti_version.h>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Process-wide state that the error path must clean up.

pid_t g_child = -1;              // the command, once forked
bool g_child_reaped = false;     // waitpid has collected it
int g_release_fd = -1;           // write end of the pipe that lets the forked command exec
FILE* g_csv = nullptr;           // output; flushed on error so that written rows survive
volatile sig_atomic_t g_signal = 0;       // last SIGINT/SIGTERM/SIGHUP received
volatile sig_atomic_t g_forward_pid = 0;  // pid that such signals are forwarded to (0: none)

// Stops the command if it runs (SIGTERM, then SIGKILL after 5 s) and exits with `code`.
[[noreturn]] void exit_cleanly(int code) {
  if (g_csv != nullptr) fflush(g_csv);
  if (g_release_fd >= 0) {  // a command still waiting for its release sees EOF and exits 125
    close(g_release_fd);
    g_release_fd = -1;
  }
  if (g_child > 0 && !g_child_reaped) {
    kill(g_child, SIGTERM);
    int status = 0;
    for (int i = 0; i < 500 && waitpid(g_child, &status, WNOHANG) == 0; ++i) usleep(10000);
    if (waitpid(g_child, &status, WNOHANG) == 0) {
      kill(g_child, SIGKILL);
      waitpid(g_child, &status, 0);
    }
    g_child_reaped = true;
  }
  exit(code);
}

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("pm_sampler: error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit_cleanly(2);
}

const char* cupti_result_name(CUptiResult r) {
  const char* s = nullptr;
  if (cuptiGetResultString(r, &s) != CUPTI_SUCCESS || s == nullptr) return "(unnamed CUptiResult)";
  return s;
}

const char* cupti_result_message(CUptiResult r) {
  const char* s = nullptr;
  if (cuptiGetErrorMessage(r, &s) != CUPTI_SUCCESS || s == nullptr) return "";
  return s;
}

void check_cupti(CUptiResult r, const char* call) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = cupti_result_message(r);
  fprintf(stderr, "pm_sampler: error: %s failed: %s (%d)%s%s\n", call, cupti_result_name(r),
          static_cast<int>(r), *msg ? ": " : "", msg);
  if (r == CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
    fputs("pm_sampler: profiling counters need root or NVreg_RestrictProfilingToAdminUsers=0\n",
          stderr);
  exit_cleanly(2);
}

void check_cu(CUresult r, const char* call) {
  if (r == CUDA_SUCCESS) return;
  const char* name = nullptr;
  const char* text = nullptr;
  if (cuGetErrorName(r, &name) != CUDA_SUCCESS || name == nullptr) name = "(unnamed CUresult)";
  if (cuGetErrorString(r, &text) != CUDA_SUCCESS || text == nullptr) text = "";
  fprintf(stderr, "pm_sampler: error: %s failed: %s (%d)%s%s\n", call, name,
          static_cast<int>(r), *text ? ": " : "", text);
  exit_cleanly(2);
}

#define CUPTI_CALL(call) check_cupti((call), #call)
#define CU_CALL(call) check_cu((call), #call)

// A CUPTI parameter struct, zeroed, with its structSize set (pPriv stays NULL).
template <typename T>
T make_params(size_t struct_size) {
  T p{};
  p.structSize = struct_size;
  return p;
}
#define PARAMS(T) make_params<T>(T##_STRUCT_SIZE)

uint64_t clock_ns(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

uint64_t cupti_now_ns() {
  uint64_t t = 0;
  CUPTI_CALL(cuptiGetTimestamp(&t));
  return t;
}

// The three clocks at one moment, so that sample timestamps can be placed on host timelines.
void print_clocks(const char* when) {
  const uint64_t cupti = cupti_now_ns();
  const uint64_t real = clock_ns(CLOCK_REALTIME);
  const uint64_t mono = clock_ns(CLOCK_MONOTONIC);
  fprintf(stderr, "pm_sampler: clocks %s: cupti_ns=%" PRIu64 " realtime_ns=%" PRIu64
                  " monotonic_ns=%" PRIu64 "\n", when, cupti, real, mono);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    std::string item = s.substr(start, end - start);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) out.push_back(item);
    start = end + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Metric presets. Each role lists candidate names, best first; a preset is resolved on the
// device by taking, role by role in priority order, the first candidate that the chip knows and
// that still fits one pass together with the metrics taken before it (PM sampling collects one
// pass only). Roles that resolve to nothing are dropped with a note. Names follow CUPTI's PM
// sampling metric table and Nsight Compute's PM-sampling sections; `--list` shows the chip's.

struct Role {
  const char* label;
  std::vector<const char*> candidates;
};

// Enough to name a kernel's limiting resource: SM residency, issue, occupancy, DRAM, L2, clocks.
const std::vector<Role>& default_preset() {
  static const std::vector<Role> roles = {
      {"SM active cycles / elapsed (%)", {"sm__cycles_active.avg.pct_of_peak_sustained_elapsed"}},
      {"issue slots used (%)",
       {"sm__inst_executed_realtime.avg.pct_of_peak_sustained_elapsed",
        "smsp__issue_active.avg.pct_of_peak_sustained_elapsed",
        "sm__inst_executed.avg.pct_of_peak_sustained_elapsed"}},
      {"warp slots occupied (%)",
       {"tpc__warps_active_realtime.avg.pct_of_peak_sustained_elapsed",
        "sm__warps_active.avg.pct_of_peak_sustained_elapsed"}},
      {"DRAM read (% of peak)",
       {"dramc__read_throughput.avg.pct_of_peak_sustained_elapsed",
        "dram__read_throughput.avg.pct_of_peak_sustained_elapsed"}},
      {"DRAM write (% of peak)",
       {"dramc__write_throughput.avg.pct_of_peak_sustained_elapsed",
        "dram__write_throughput.avg.pct_of_peak_sustained_elapsed"}},
      {"L2 throughput (% of peak)",
       {"lts__throughput.avg.pct_of_peak_sustained_elapsed",
        "lts__t_sectors.avg.pct_of_peak_sustained_elapsed"}},
      {"GPC clock (Hz)", {"gpc__cycles_elapsed.avg.per_second"}},
      {"compute engine busy (%)", {"gr__cycles_active.sum.pct_of_peak_sustained_elapsed"}},
      {"idle warp slots on active SMs (%)",
       {"tpc__warps_inactive_sm_active_realtime.avg.pct_of_peak_sustained_elapsed"}},
      {"warp slots on idle SMs (%)",
       {"tpc__warps_inactive_sm_idle_realtime.avg.pct_of_peak_sustained_elapsed"}},
      {"DRAM throughput (% of peak)",
       {"dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "dramc__throughput.avg.pct_of_peak_sustained_elapsed"}},
      {"DRAM bytes read (B/s)", {"dram__bytes_read.sum.per_second"}},
      {"DRAM bytes written (B/s)", {"dram__bytes_write.sum.per_second"}},
      {"L1TEX throughput (% of peak)", {"l1tex__throughput.avg.pct_of_peak_sustained_elapsed"}},
      {"SM throughput (% of peak)", {"sm__throughput.avg.pct_of_peak_sustained_elapsed"}},
      {"SYS clock (Hz)", {"sys__cycles_elapsed.avg.per_second"}},
  };
  return roles;
}

// Warp states per SM sub-partition: why issue slots go unused.
const std::vector<Role>& stalls_preset() {
  static const std::vector<Role> roles = {
      {"SM active cycles / elapsed (%)", {"sm__cycles_active.avg.pct_of_peak_sustained_elapsed"}},
      {"issue slots used (%)",
       {"sm__inst_executed_realtime.avg.pct_of_peak_sustained_elapsed",
        "smsp__issue_active.avg.pct_of_peak_sustained_elapsed"}},
      {"warps active per SMSP cycle",
       {"smsp__warps_active.avg.per_cycle_active", "smsp__warps_active.avg"}},
      {"stalled: long scoreboard",
       {"smsp__warps_issue_stalled_long_scoreboard.avg.per_cycle_active",
        "smsp__warps_issue_stalled_long_scoreboard.avg"}},
      {"stalled: barrier",
       {"smsp__warps_issue_stalled_barrier.avg.per_cycle_active",
        "smsp__warps_issue_stalled_barrier.avg"}},
      {"stalled: short scoreboard",
       {"smsp__warps_issue_stalled_short_scoreboard.avg.per_cycle_active",
        "smsp__warps_issue_stalled_short_scoreboard.avg"}},
      {"stalled: wait",
       {"smsp__warps_issue_stalled_wait.avg.per_cycle_active",
        "smsp__warps_issue_stalled_wait.avg"}},
      {"stalled: math pipe throttle",
       {"smsp__warps_issue_stalled_math_pipe_throttle.avg.per_cycle_active",
        "smsp__warps_issue_stalled_math_pipe_throttle.avg"}},
      {"stalled: MIO throttle",
       {"smsp__warps_issue_stalled_mio_throttle.avg.per_cycle_active",
        "smsp__warps_issue_stalled_mio_throttle.avg"}},
      {"stalled: LG throttle",
       {"smsp__warps_issue_stalled_lg_throttle.avg.per_cycle_active",
        "smsp__warps_issue_stalled_lg_throttle.avg"}},
      {"stalled: not selected",
       {"smsp__warps_issue_stalled_not_selected.avg.per_cycle_active",
        "smsp__warps_issue_stalled_not_selected.avg"}},
      {"stalled: no instruction",
       {"smsp__warps_issue_stalled_no_instruction.avg.per_cycle_active",
        "smsp__warps_issue_stalled_no_instruction.avg"}},
      {"stalled: dispatch",
       {"smsp__warps_issue_stalled_dispatch_stall.avg.per_cycle_active",
        "smsp__warps_issue_stalled_dispatch_stall.avg"}},
      {"stalled: membar",
       {"smsp__warps_issue_stalled_membar.avg.per_cycle_active",
        "smsp__warps_issue_stalled_membar.avg"}},
      {"stalled: branch resolving",
       {"smsp__warps_issue_stalled_branch_resolving.avg.per_cycle_active",
        "smsp__warps_issue_stalled_branch_resolving.avg"}},
  };
  return roles;
}

const std::vector<Role>* preset_by_name(const std::string& name) {
  if (name == "default") return &default_preset();
  if (name == "stalls") return &stalls_preset();
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Options.

struct Options {
  int device = 0;
  uint64_t interval = 50000;  // ns (time trigger) or SYS clock cycles (--sysclk)
  bool sysclk = false;
  uint32_t max_samples = 50000;
  size_t hw_buffer_mb = 512;
  unsigned decode_ms = 10;
  double duration_s = 0;      // sampling time when no command is given
  std::string preset = "default";
  std::vector<std::string> metrics;  // explicit list: validated strictly
  std::string out;
  bool list = false;
  bool list_submetrics = false;
  bool verbose = false;
  std::vector<char*> command;  // NULL-terminated when non-empty
};

void usage(FILE* f) {
  fputs(
      "usage: pm_sampler [options] --out FILE.csv -- COMMAND [ARGS...]\n"
      "       pm_sampler [options] --out FILE.csv --duration-s SECONDS\n"
      "       pm_sampler --list [--list-submetrics] [--device N]\n"
      "\n"
      "Samples device-wide GPU performance counters (CUPTI PM sampling) while COMMAND runs\n"
      "and writes one CSV row per sample: sample_start_ns,sample_end_ns,<metrics...>.\n"
      "\n"
      "options:\n"
      "  --out FILE            CSV output (required unless --list)\n"
      "  --metrics a,b,...     metric names (strictly validated; see --list)\n"
      "  --preset NAME         metric preset when --metrics is absent: default | stalls\n"
      "                        (default: SM active, issue, occupancy, DRAM, L2, clocks)\n"
      "  --interval-ns N       sampling interval in ns (default 50000)\n"
      "  --sysclk N            trigger on SYS clock cycles instead: one sample per N cycles\n"
      "  --max-samples M       capacity of the counter data image in samples (default 50000)\n"
      "  --hw-buffer-mb N      hardware buffer for raw samples, MiB (default 512)\n"
      "  --decode-ms N         drain the hardware buffer every N ms (default 10)\n"
      "  --duration-s S        without a command: sample for S seconds (or until SIGINT)\n"
      "  --device N            CUDA device ordinal (default 0)\n"
      "  --list                print device, chip and the metrics PM sampling supports on it,\n"
      "                        and how the presets resolve there\n"
      "  --list-submetrics     with --list: also every full metric name (base.rollup.submetric)\n"
      "  -v, --verbose         print every decode (otherwise the first three)\n"
      "  -h, --help            this text\n",
      f);
}

uint64_t parse_u64(const char* opt, const char* s) {
  if (s == nullptr) fail("%s needs a value", opt);
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || s[0] == '-') fail("%s: not a number: '%s'", opt, s);
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_interval = false;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    auto value = [&]() -> const char* {
      if (next == nullptr) fail("%s needs a value", a.c_str());
      ++i;
      return next;
    };
    if (a == "--") {
      ++i;
      break;
    } else if (a == "--out") {
      o.out = value();
    } else if (a == "--metrics") {
      o.metrics = split_commas(value());
      if (o.metrics.empty()) fail("--metrics: empty list");
    } else if (a == "--preset") {
      o.preset = value();
      if (preset_by_name(o.preset) == nullptr)
        fail("--preset: unknown preset '%s' (default, stalls)", o.preset.c_str());
    } else if (a == "--interval-ns") {
      o.interval = parse_u64("--interval-ns", value());
      have_interval = true;
    } else if (a == "--sysclk") {
      o.interval = parse_u64("--sysclk", value());
      o.sysclk = true;
    } else if (a == "--max-samples") {
      const uint64_t m = parse_u64("--max-samples", value());
      if (m == 0 || m > UINT32_MAX) fail("--max-samples: must be in 1..%u", UINT32_MAX);
      o.max_samples = static_cast<uint32_t>(m);
    } else if (a == "--hw-buffer-mb") {
      o.hw_buffer_mb = parse_u64("--hw-buffer-mb", value());
    } else if (a == "--decode-ms") {
      o.decode_ms = static_cast<unsigned>(parse_u64("--decode-ms", value()));
    } else if (a == "--duration-s") {
      const char* s = value();
      char* end = nullptr;
      o.duration_s = strtod(s, &end);
      if (end == s || *end != '\0' || !(o.duration_s > 0)) fail("--duration-s: bad value '%s'", s);
    } else if (a == "--device") {
      o.device = static_cast<int>(parse_u64("--device", value()));
    } else if (a == "--list") {
      o.list = true;
    } else if (a == "--list-submetrics") {
      o.list = true;
      o.list_submetrics = true;
    } else if (a == "-v" || a == "--verbose") {
      o.verbose = true;
    } else if (a == "-h" || a == "--help") {
      usage(stdout);
      exit(0);
    } else {
      usage(stderr);
      fail("unknown argument '%s' (the command goes after --)", a.c_str());
    }
  }
  for (; i < argc; ++i) o.command.push_back(argv[i]);
  if (!o.command.empty()) o.command.push_back(nullptr);

  if (o.sysclk && have_interval) fail("--interval-ns and --sysclk exclude each other");
  if (o.interval == 0) fail("the sampling interval must be positive");
  if (o.hw_buffer_mb == 0) fail("--hw-buffer-mb must be positive");
  if (o.decode_ms == 0) fail("--decode-ms must be positive");
  if (o.list) return o;
  if (o.out.empty()) fail("--out FILE.csv is required (see --help)");
  if (o.command.empty() && o.duration_s <= 0)
    fail("give a command after -- or a sampling time with --duration-s");
  if (!o.command.empty() && o.duration_s > 0)
    fail("--duration-s is for runs without a command");
  return o;
}

// ---------------------------------------------------------------------------------------------
// The command: forked before CUDA is initialised, exec'd once sampling runs.

void on_signal(int sig, siginfo_t* info, void*) {
  g_signal = sig;
  // A terminal's ^C reaches the whole foreground process group already; forward only signals
  // sent to this process alone (kill, timeout), so that the command gets each signal once.
  const pid_t target = static_cast<pid_t>(g_forward_pid);
  if (target > 0 && info != nullptr && (info->si_code == SI_USER || info->si_code == SI_QUEUE))
    kill(target, sig);
}

// Installed after the command is forked, so that the command keeps the dispositions it was
// started with. SIGPIPE is ignored so that releasing a command that already died is an error
// message, not a silent death.
void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP})
    if (sigaction(sig, &sa, nullptr) != 0) fail("sigaction: %s", strerror(errno));
  if (signal(SIGPIPE, SIG_IGN) == SIG_ERR) fail("signal(SIGPIPE): %s", strerror(errno));
}

// Forks the command; it blocks until release_command() and then execs. Returns the fd on which
// the exec outcome arrives (EOF: exec succeeded; an int: its errno).
int fork_command(char** argv) {
  int release[2];
  int status[2];
  if (pipe2(release, O_CLOEXEC) != 0 || pipe2(status, O_CLOEXEC) != 0)
    fail("pipe2: %s", strerror(errno));
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) fail("fork: %s", strerror(errno));
  if (pid == 0) {
    close(release[1]);
    close(status[0]);
    char go = 0;
    ssize_t n;
    do {
      n = read(release[0], &go, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1) _exit(125);  // the sampler gave up before sampling started
    execvp(argv[0], argv);
    const int err = errno;
    const ssize_t w = write(status[1], &err, sizeof err);
    (void)w;
    _exit(127);
  }
  close(release[0]);
  close(status[1]);
  g_child = pid;
  g_release_fd = release[1];
  return status[0];
}

void release_command(int status_fd, const char* name) {
  if (g_signal != 0) fail("interrupted (signal %d) before the command started", int(g_signal));
  const char go = 1;
  if (write(g_release_fd, &go, 1) != 1)
    fail("the command exited before it was started: %s", strerror(errno));
  close(g_release_fd);
  g_release_fd = -1;
  g_forward_pid = static_cast<sig_atomic_t>(g_child);
  int err = 0;
  ssize_t n;
  do {
    n = read(status_fd, &err, sizeof err);
  } while (n < 0 && errno == EINTR);
  close(status_fd);
  if (n == static_cast<ssize_t>(sizeof err)) {
    int st = 0;
    waitpid(g_child, &st, 0);
    g_child_reaped = true;
    fail("cannot run '%s': %s", name, strerror(err));
  }
}

// ---------------------------------------------------------------------------------------------
// Device, CUPTI profiler host objects and metric validation.

struct Device {
  int index = 0;
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
  std::string name;
  std::string chip;
  std::string pci;
  std::string uuid;
  int cc_major = 0;
  int cc_minor = 0;
  int sms = 0;
  int driver_version = 0;
  uint32_t cupti_version = 0;
  std::vector<uint8_t> availability;  // counter availability image
};

const char* support_level_name(CUpti_Profiler_Support_Level s) {
  switch (s) {
    case CUPTI_PROFILER_CONFIGURATION_UNKNOWN: return "unknown";
    case CUPTI_PROFILER_CONFIGURATION_UNSUPPORTED: return "UNSUPPORTED";
    case CUPTI_PROFILER_CONFIGURATION_DISABLED: return "DISABLED";
    case CUPTI_PROFILER_CONFIGURATION_SUPPORTED: return "supported";
  }
  return "?";
}

// CUDA context, CUPTI profiler initialisation, PM-sampling support check, chip name and counter
// availability image of device `index`. Prints a description to `out`.
Device open_device(int index, FILE* out) {
  Device d;
  d.index = index;
  if (const char* vis = getenv("CUDA_VISIBLE_DEVICES"))
    fprintf(out, "pm_sampler: note: CUDA_VISIBLE_DEVICES=%s (device %d is counted in that list)\n",
            vis, index);
  CU_CALL(cuInit(0));
  CU_CALL(cuDriverGetVersion(&d.driver_version));
  int count = 0;
  CU_CALL(cuDeviceGetCount(&count));
  if (index >= count) fail("device %d requested, but CUDA sees %d device(s)", index, count);
  CU_CALL(cuDeviceGet(&d.dev, index));
  char name[256] = {};
  CU_CALL(cuDeviceGetName(name, sizeof name - 1, d.dev));
  d.name = name;
  CU_CALL(cuDeviceGetAttribute(&d.cc_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, d.dev));
  CU_CALL(cuDeviceGetAttribute(&d.cc_minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, d.dev));
  CU_CALL(cuDeviceGetAttribute(&d.sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, d.dev));
  char pci[64] = {};
  CU_CALL(cuDeviceGetPCIBusId(pci, sizeof pci - 1, d.dev));
  d.pci = pci;
  CUuuid uuid{};
  CU_CALL(cuDeviceGetUuid(&uuid, d.dev));
  char u[64];
  const unsigned char* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  snprintf(u, sizeof u,
           "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
           b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
           b[15]);
  d.uuid = u;
  CU_CALL(cuDevicePrimaryCtxRetain(&d.ctx, d.dev));
  CU_CALL(cuCtxSetCurrent(d.ctx));

  CUPTI_CALL(cuptiGetVersion(&d.cupti_version));
  auto init = PARAMS(CUpti_Profiler_Initialize_Params);
  CUPTI_CALL(cuptiProfilerInitialize(&init));

  auto sup = PARAMS(CUpti_Profiler_DeviceSupported_Params);
  sup.cuDevice = d.dev;
  sup.api = CUPTI_PROFILER_PM_SAMPLING;
  CUPTI_CALL(cuptiProfilerDeviceSupported(&sup));

  auto chip = PARAMS(CUpti_Device_GetChipName_Params);
  chip.deviceIndex = static_cast<size_t>(index);
  CUPTI_CALL(cuptiDeviceGetChipName(&chip));
  d.chip = chip.pChipName != nullptr ? chip.pChipName : "?";

  fprintf(out, "pm_sampler: device %d: %s, chip %s, sm_%d%d, %d SMs, PCI %s, %s\n", index,
          d.name.c_str(), d.chip.c_str(), d.cc_major, d.cc_minor, d.sms, d.pci.c_str(),
          d.uuid.c_str());
  fprintf(out, "pm_sampler: CUDA driver API %d, CUPTI API %u (built against %d, CUDA_VERSION %d)\n",
          d.driver_version, d.cupti_version, CUPTI_API_VERSION, CUDA_VERSION);
  fprintf(out, "pm_sampler: PM sampling support: %s (architecture %s, SLI %s, vGPU %s, "
               "confidential compute %s, CMP %s, WSL %s)\n",
          support_level_name(sup.isSupported), support_level_name(sup.architecture),
          support_level_name(sup.sli), support_level_name(sup.vGpu),
          support_level_name(sup.confidentialCompute), support_level_name(sup.cmp),
          support_level_name(sup.wsl));
  if (sup.isSupported != CUPTI_PROFILER_CONFIGURATION_SUPPORTED)
    fail("CUPTI reports PM sampling as not supported on device %d (see the line above)", index);

  auto avail = PARAMS(CUpti_PmSampling_GetCounterAvailability_Params);
  avail.deviceIndex = static_cast<size_t>(index);
  CUPTI_CALL(cuptiPmSamplingGetCounterAvailability(&avail));  // size query
  d.availability.assign(avail.counterAvailabilityImageSize, 0);
  avail.pCounterAvailabilityImage = d.availability.data();
  CUPTI_CALL(cuptiPmSamplingGetCounterAvailability(&avail));
  return d;
}

void close_device(Device& d) {
  auto deinit = PARAMS(CUpti_Profiler_DeInitialize_Params);
  CUPTI_CALL(cuptiProfilerDeInitialize(&deinit));
  CU_CALL(cuDevicePrimaryCtxRelease(d.dev));
}

CUpti_Profiler_Host_Object* host_create(const Device& d) {
  auto p = PARAMS(CUpti_Profiler_Host_Initialize_Params);
  p.profilerType = CUPTI_PROFILER_TYPE_PM_SAMPLING;
  p.pChipName = d.chip.c_str();
  p.pCounterAvailabilityImage = d.availability.data();
  CUPTI_CALL(cuptiProfilerHostInitialize(&p));
  return p.pHostObject;
}

void host_destroy(CUpti_Profiler_Host_Object* host) {
  auto p = PARAMS(CUpti_Profiler_Host_Deinitialize_Params);
  p.pHostObject = host;
  CUPTI_CALL(cuptiProfilerHostDeinitialize(&p));
}

struct MetricInfo {
  CUptiResult result = CUPTI_SUCCESS;  // of cuptiProfilerHostGetMetricProperties
  std::string description;
  std::string hw_unit;
  std::string dim_unit;
  CUpti_MetricType type = CUPTI_METRIC_TYPE_COUNTER;
};

// Properties of `name`; result != CUPTI_SUCCESS when the chip does not know the metric.
MetricInfo metric_info(CUpti_Profiler_Host_Object* host, const char* name) {
  auto p = PARAMS(CUpti_Profiler_Host_GetMetricProperties_Params);
  p.pHostObject = host;
  p.pMetricName = name;
  MetricInfo m;
  m.result = cuptiProfilerHostGetMetricProperties(&p);
  if (m.result == CUPTI_SUCCESS) {
    m.description = p.pDescription != nullptr ? p.pDescription : "";
    m.hw_unit = p.pHwUnit != nullptr ? p.pHwUnit : "";
    m.dim_unit = p.pDimUnit != nullptr ? p.pDimUnit : "";
    m.type = p.metricType;
  }
  return m;
}

// Result of scheduling a metric list on a fresh host object.
struct Config {
  CUptiResult result = CUPTI_SUCCESS;  // first failing call's result
  const char* failed_call = nullptr;   // that call, or nullptr
  size_t passes = 0;
  std::vector<uint8_t> image;          // config image (when result == CUPTI_SUCCESS)
  CUpti_Profiler_Host_Object* host = nullptr;  // kept only when asked for
};

// Adds `metrics` to a fresh host object and builds the config image. Failures of the metric
// calls are returned, not fatal: they are how unknown or multi-pass metric lists show up.
Config schedule(const Device& d, const std::vector<const char*>& metrics, bool keep_host) {
  Config c;
  CUpti_Profiler_Host_Object* host = host_create(d);
  auto add = PARAMS(CUpti_Profiler_Host_ConfigAddMetrics_Params);
  add.pHostObject = host;
  add.ppMetricNames = const_cast<const char**>(metrics.data());
  add.numMetrics = metrics.size();
  c.result = cuptiProfilerHostConfigAddMetrics(&add);
  if (c.result != CUPTI_SUCCESS) {
    c.failed_call = "cuptiProfilerHostConfigAddMetrics";
  } else {
    auto size = PARAMS(CUpti_Profiler_Host_GetConfigImageSize_Params);
    size.pHostObject = host;
    c.result = cuptiProfilerHostGetConfigImageSize(&size);
    if (c.result != CUPTI_SUCCESS) {
      c.failed_call = "cuptiProfilerHostGetConfigImageSize";
    } else {
      c.image.assign(size.configImageSize, 0);
      auto get = PARAMS(CUpti_Profiler_Host_GetConfigImage_Params);
      get.pHostObject = host;
      get.configImageSize = c.image.size();
      get.pConfigImage = c.image.data();
      c.result = cuptiProfilerHostGetConfigImage(&get);
      if (c.result != CUPTI_SUCCESS) {
        c.failed_call = "cuptiProfilerHostGetConfigImage";
      } else {
        auto passes = PARAMS(CUpti_Profiler_Host_GetNumOfPasses_Params);
        passes.configImageSize = c.image.size();
        passes.pConfigImage = c.image.data();
        c.result = cuptiProfilerHostGetNumOfPasses(&passes);
        if (c.result != CUPTI_SUCCESS) c.failed_call = "cuptiProfilerHostGetNumOfPasses";
        c.passes = passes.numOfPasses;
      }
    }
  }
  if (keep_host && c.result == CUPTI_SUCCESS) {
    c.host = host;
  } else {
    host_destroy(host);
  }
  return c;
}

std::string describe_failure(const Config& c) {
  if (c.result != CUPTI_SUCCESS)
    return std::string(c.failed_call) + ": " + cupti_result_name(c.result);
  return std::to_string(c.passes) + " passes";
}

// Strict validation of an explicit metric list: the list must schedule on the chip and fit one
// pass. On failure the offending metric is named: the first that does not schedule alone (an
// unknown name, or one that needs more than a pass by itself), else the first at which the list
// stops fitting one pass. Scheduling, not cuptiProfilerHostGetMetricProperties, is the judge.
void validate_explicit(const Device& d, CUpti_Profiler_Host_Object* host,
                       const std::vector<std::string>& names) {
  for (size_t i = 0; i < names.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (names[i] == names[j]) fail("metric '%s' is listed twice", names[i].c_str());
  std::vector<const char*> all;
  for (const auto& n : names) all.push_back(n.c_str());
  const Config whole = schedule(d, all, false);
  if (whole.result == CUPTI_SUCCESS && whole.passes == 1) return;

  for (const char* n : all) {
    const Config one = schedule(d, {n}, false);
    if (one.result != CUPTI_SUCCESS || one.passes != 1) {
      const MetricInfo m = metric_info(host, n);
      fail("metric '%s' cannot be PM-sampled on %s (%s; cuptiProfilerHostGetMetricProperties: %s)."
           " Run 'pm_sampler --list' for the chip's metric names",
           n, d.chip.c_str(), describe_failure(one).c_str(), cupti_result_name(m.result));
    }
  }
  std::vector<const char*> prefix;
  for (const char* n : all) {
    prefix.push_back(n);
    const Config c = schedule(d, prefix, false);
    if (c.result != CUPTI_SUCCESS || c.passes != 1)
      fail("the metrics up to '%s' do not fit the single pass that PM sampling collects (%s); "
           "%zu metric(s) before it do. Drop some, or sample them in separate runs",
           n, describe_failure(c).c_str(), prefix.size() - 1);
  }
  fail("the metric list does not schedule in one pass (%s), although every prefix does",
       describe_failure(whole).c_str());
}

struct Resolved {
  std::vector<std::string> names;
  std::vector<std::string> labels;
  std::vector<std::string> notes;  // one line per role: what was taken or why it was dropped
};

// Resolution of a preset on this chip (see the comment above default_preset()): all first
// choices at once when they fit one pass, else greedily, role by role.
Resolved resolve_preset(const Device& d, const std::vector<Role>& roles) {
  Resolved r;
  std::vector<const char*> firsts;
  for (const Role& role : roles) firsts.push_back(role.candidates.front());
  const Config all = schedule(d, firsts, false);
  if (all.result == CUPTI_SUCCESS && all.passes == 1) {
    for (const Role& role : roles) {
      r.names.push_back(role.candidates.front());
      r.labels.push_back(role.label);
      r.notes.push_back(std::string("  ok       ") + role.label + ": " + role.candidates.front());
    }
    return r;
  }
  std::vector<const char*> chosen;
  for (const Role& role : roles) {
    std::string why;
    bool taken = false;
    for (const char* cand : role.candidates) {
      const Config alone = schedule(d, {cand}, false);
      if (alone.result != CUPTI_SUCCESS || alone.passes != 1) {
        why += std::string(why.empty() ? "" : "; ") + cand + ": " + describe_failure(alone);
        continue;
      }
      std::vector<const char*> trial = chosen;
      trial.push_back(cand);
      const Config c = schedule(d, trial, false);
      if (c.result != CUPTI_SUCCESS || c.passes != 1) {
        why += std::string(why.empty() ? "" : "; ") + cand + ": " + describe_failure(c) +
               " with the metrics before it";
        continue;
      }
      chosen.push_back(cand);
      r.names.push_back(cand);
      r.labels.push_back(role.label);
      r.notes.push_back(std::string("  ok       ") + role.label + ": " + cand);
      taken = true;
      break;
    }
    if (!taken) r.notes.push_back(std::string("  dropped  ") + role.label + " -- " + why);
  }
  return r;
}

const char* metric_type_name(CUpti_MetricType t) {
  switch (t) {
    case CUPTI_METRIC_TYPE_COUNTER: return "counter";
    case CUPTI_METRIC_TYPE_RATIO: return "ratio";
    case CUPTI_METRIC_TYPE_THROUGHPUT: return "throughput";
    default: return "?";
  }
}

// --list: everything the first run on a new machine should show.
int run_list(const Options& o) {
  Device d = open_device(o.device, stdout);
  CUpti_Profiler_Host_Object* host = host_create(d);

  auto maxp = PARAMS(CUpti_Profiler_Host_GetMaxNumHardwareMetricsPerPass_Params);
  maxp.profilerType = CUPTI_PROFILER_TYPE_PM_SAMPLING;
  maxp.pChipName = d.chip.c_str();
  maxp.pCounterAvailabilityImage = d.availability.data();
  CUPTI_CALL(cuptiProfilerHostGetMaxNumHardwareMetricsPerPass(&maxp));
  printf("pm_sampler: at most %zu hardware metrics per pass (PM sampling collects one pass)\n",
         maxp.maxMetricsPerPass);

  for (int t = 0; t < static_cast<int>(CUPTI_METRIC_TYPE__COUNT); ++t) {
    const auto type = static_cast<CUpti_MetricType>(t);
    auto base = PARAMS(CUpti_Profiler_Host_GetBaseMetrics_Params);
    base.pHostObject = host;
    base.metricType = type;
    CUPTI_CALL(cuptiProfilerHostGetBaseMetrics(&base));
    std::vector<std::string> names;
    for (size_t i = 0; i < base.numMetrics; ++i) names.emplace_back(base.ppMetricNames[i]);
    std::sort(names.begin(), names.end());
    printf("\n# %zu %s base metrics on %s (PM sampling). Add a rollup (.sum .avg .min .max) "
           "for counters and throughputs, then optionally a submetric (e.g. "
           ".pct_of_peak_sustained_elapsed, .per_second); ratios take .pct/.ratio/.max_rate\n",
           names.size(), metric_type_name(type), d.chip.c_str());
    for (const std::string& n : names) {
      const MetricInfo m = metric_info(host, n.c_str());
      if (m.result == CUPTI_SUCCESS) {
        printf("%-70s [%s] (%s; %s) %s\n", n.c_str(), metric_type_name(type), m.hw_unit.c_str(),
               m.dim_unit.c_str(), m.description.c_str());
      } else {
        printf("%-70s [%s] (properties: %s)\n", n.c_str(), metric_type_name(type),
               cupti_result_name(m.result));
      }
      if (!o.list_submetrics) continue;
      auto sub = PARAMS(CUpti_Profiler_Host_GetSubMetrics_Params);
      sub.pHostObject = host;
      sub.metricType = type;
      sub.pMetricName = n.c_str();
      const CUptiResult r = cuptiProfilerHostGetSubMetrics(&sub);
      if (r != CUPTI_SUCCESS) {
        printf("    (submetrics: %s)\n", cupti_result_name(r));
        continue;
      }
      for (size_t i = 0; i < sub.numOfSubmetrics; ++i) {
        const std::string s = sub.ppSubMetrics[i] != nullptr ? sub.ppSubMetrics[i] : "";
        if (s.rfind(n, 0) == 0) {
          printf("    %s\n", s.c_str());  // already a full name
        } else {
          printf("    %s%s%s\n", n.c_str(), (!s.empty() && s[0] == '.') ? "" : ".", s.c_str());
        }
      }
    }
  }

  for (const char* preset : {"default", "stalls"}) {
    const Resolved r = resolve_preset(d, *preset_by_name(preset));
    printf("\n# preset '%s' on %s: %zu metric(s) in one pass\n", preset, d.chip.c_str(),
           r.names.size());
    for (const std::string& line : r.notes) printf("%s\n", line.c_str());
  }
  host_destroy(host);
  close_device(d);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Sampling.

struct Stats {
  uint64_t samples = 0;          // rows written
  uint64_t first_start = 0;
  uint64_t last_end = 0;
  uint64_t gaps = 0;             // a sample starting over half a sample after the previous end
  uint64_t gap_ns = 0;           // time between samples in those gaps
  uint64_t overlaps = 0;         // a sample starting over half a sample before the previous end
  uint64_t jitter = 0;           // other samples whose start differs from the previous end
  uint64_t decodes = 0;
  uint64_t decode_ns = 0;        // host time in cuptiPmSamplingDecodeData
  uint64_t evaluate_ns = 0;      // host time in sample info + evaluation + CSV
  uint64_t images_filled = 0;    // decodes that stopped on a full counter data image
  uint64_t overflow_decodes = 0; // decodes that reported a hardware buffer overflow
  uint64_t incomplete_dropped = 0;  // populated but incomplete samples lost at image resets
  uint64_t rewrites = 0;         // decodes that restarted the image instead of appending
  uint64_t stop_other = 0;       // decodes that stopped for CUPTI's "other" reason
  uint64_t max_new = 0;          // most samples completed by one decode
  uint64_t decodes_reported = 0; // decodes printed to stderr
  bool hw_buffer_lost = false;   // DecodeData returned CUPTI_ERROR_OUT_OF_MEMORY
};

struct Sampler {
  CUpti_PmSampling_Object* obj = nullptr;
  CUpti_Profiler_Host_Object* host = nullptr;  // evaluates the configured metrics
  std::vector<const char*> metrics;
  std::vector<uint8_t> image;   // counter data image
  size_t evaluated = 0;         // samples of `image` already written
  uint64_t evaluated_last_end = 0;  // end timestamp of sample evaluated - 1
  std::vector<double> values;
  bool verbose = false;
  Stats st;
};

void reset_image(Sampler& s) {
  auto p = PARAMS(CUpti_PmSampling_CounterDataImage_Initialize_Params);
  p.pPmSamplingObject = s.obj;
  p.counterDataSize = s.image.size();
  p.pCounterData = s.image.data();
  CUPTI_CALL(cuptiPmSamplingCounterDataImageInitialize(&p));
  s.evaluated = 0;
  s.evaluated_last_end = 0;
}

struct SampleTime {
  uint64_t start;
  uint64_t end;
};

SampleTime sample_time(Sampler& s, size_t index) {
  auto p = PARAMS(CUpti_PmSampling_CounterData_GetSampleInfo_Params);
  p.pPmSamplingObject = s.obj;
  p.pCounterDataImage = s.image.data();
  p.counterDataImageSize = s.image.size();
  p.sampleIndex = index;
  CUPTI_CALL(cuptiPmSamplingCounterDataGetSampleInfo(&p));
  return {p.startTimestamp, p.endTimestamp};
}

// Evaluates samples [s.evaluated, completed) of the image and appends them to the CSV.
void write_samples(Sampler& s, size_t completed) {
  for (size_t i = s.evaluated; i < completed; ++i) {
    const SampleTime t = sample_time(s, i);
    auto p = PARAMS(CUpti_Profiler_Host_EvaluateToGpuValues_Params);
    p.pHostObject = s.host;
    p.pCounterDataImage = s.image.data();
    p.counterDataImageSize = s.image.size();
    p.rangeIndex = i;
    p.ppMetricNames = s.metrics.data();
    p.numMetrics = s.metrics.size();
    p.pMetricValues = s.values.data();
    CUPTI_CALL(cuptiProfilerHostEvaluateToGpuValues(&p));

    fprintf(g_csv, "%" PRIu64 ",%" PRIu64, t.start, t.end);
    for (double v : s.values) fprintf(g_csv, ",%.7g", v);
    fputc('\n', g_csv);
    if (ferror(g_csv)) fail("writing the CSV: %s", strerror(errno));

    Stats& st = s.st;
    const uint64_t half = (t.end > t.start ? t.end - t.start : 0) / 2;
    if (st.samples == 0) {
      st.first_start = t.start;
    } else if (t.start > st.last_end + half) {
      ++st.gaps;
      st.gap_ns += t.start - st.last_end;
    } else if (t.start + half < st.last_end) {
      ++st.overlaps;
    } else if (t.start != st.last_end) {
      ++st.jitter;
    }
    st.last_end = t.end;
    ++st.samples;
    s.evaluated_last_end = t.end;
  }
  s.evaluated = std::max(s.evaluated, completed);
}

const char* stop_reason_name(CUpti_PmSampling_DecodeStopReason r) {
  switch (r) {
    case CUPTI_PM_SAMPLING_DECODE_STOP_REASON_OTHER: return "other";
    case CUPTI_PM_SAMPLING_DECODE_STOP_REASON_COUNTER_DATA_FULL: return "counter data full";
    case CUPTI_PM_SAMPLING_DECODE_STOP_REASON_END_OF_RECORDS: return "end of records";
    default: return "?";
  }
}

// Decodes the hardware buffer until CUPTI reports no more records, writing completed samples.
// Returns false when the hardware buffer was lost (overflow that CUPTI reports as an error).
bool drain(Sampler& s) {
  for (int round = 0; round < 100000; ++round) {
    auto dec = PARAMS(CUpti_PmSampling_DecodeData_Params);
    dec.pPmSamplingObject = s.obj;
    dec.pCounterDataImage = s.image.data();
    dec.counterDataImageSize = s.image.size();
    const uint64_t t0 = clock_ns(CLOCK_MONOTONIC);
    const CUptiResult r = cuptiPmSamplingDecodeData(&dec);
    const uint64_t t1 = clock_ns(CLOCK_MONOTONIC);
    s.st.decode_ns += t1 - t0;
    ++s.st.decodes;
    if (r == CUPTI_ERROR_OUT_OF_MEMORY) {
      // Documented as a record overflow of the hardware buffer: the session's data is broken.
      fprintf(stderr, "pm_sampler: error: cuptiPmSamplingDecodeData: %s: the hardware buffer "
                      "overflowed; samples from here on are lost. Use a longer --interval-ns, a "
                      "larger --hw-buffer-mb or a shorter --decode-ms\n", cupti_result_name(r));
      s.st.hw_buffer_lost = true;
      return false;
    }
    check_cupti(r, "cuptiPmSamplingDecodeData(&dec)");
    if (dec.overflow != 0) ++s.st.overflow_decodes;

    auto info = PARAMS(CUpti_PmSampling_GetCounterDataInfo_Params);
    info.pCounterDataImage = s.image.data();
    info.counterDataImageSize = s.image.size();
    CUPTI_CALL(cuptiPmSamplingGetCounterDataInfo(&info));

    // CUPTI's samples use decode-into-the-same-image as an append; check that on the sample
    // written last and start over from sample 0 if the image was rewritten instead.
    bool rewritten = false;
    if (s.evaluated > 0) {
      if (info.numCompletedSamples < s.evaluated) {
        rewritten = true;
      } else if (sample_time(s, s.evaluated - 1).end != s.evaluated_last_end) {
        rewritten = true;
      }
      if (rewritten) {
        ++s.st.rewrites;
        s.evaluated = 0;
      }
    }
    const size_t before = s.evaluated;
    write_samples(s, info.numCompletedSamples);
    const uint64_t t2 = clock_ns(CLOCK_MONOTONIC);
    s.st.evaluate_ns += t2 - t1;
    const size_t fresh = info.numCompletedSamples - before;
    s.st.max_new = std::max<uint64_t>(s.st.max_new, fresh);

    if (s.verbose || (fresh > 0 && s.st.decodes_reported < 3)) {
      ++s.st.decodes_reported;
      fprintf(stderr, "pm_sampler: decode %" PRIu64 ": stop reason %s, overflow %u, image "
                      "total/populated/completed %zu/%zu/%zu, %zu new sample(s)%s, "
                      "decode %.2f ms, evaluate %.2f ms\n",
              s.st.decodes, stop_reason_name(dec.decodeStopReason),
              static_cast<unsigned>(dec.overflow), info.numTotalSamples,
              info.numPopulatedSamples, info.numCompletedSamples, fresh,
              rewritten ? " (image rewritten, not appended)" : "", (t1 - t0) / 1e6,
              (t2 - t1) / 1e6);
    }

    if (dec.decodeStopReason == CUPTI_PM_SAMPLING_DECODE_STOP_REASON_COUNTER_DATA_FULL) {
      ++s.st.images_filled;
      if (info.numPopulatedSamples > info.numCompletedSamples)
        s.st.incomplete_dropped += info.numPopulatedSamples - info.numCompletedSamples;
      reset_image(s);
      continue;  // more records wait in the hardware buffer
    }
    if (dec.decodeStopReason == CUPTI_PM_SAMPLING_DECODE_STOP_REASON_OTHER) ++s.st.stop_other;
    return true;
  }
  fail("cuptiPmSamplingDecodeData kept reporting a full counter data image (100000 rounds)");
}

void sleep_ms(unsigned ms) {
  timespec ts{static_cast<time_t>(ms / 1000), static_cast<long>(ms % 1000) * 1000000L};
  nanosleep(&ts, nullptr);  // an interrupting signal only shortens the wait
}

std::string join_command(const std::vector<char*>& cmd) {
  std::string s;
  for (char* a : cmd) {
    if (a == nullptr) break;
    if (!s.empty()) s += ' ';
    s += a;
  }
  return s;
}

int run_sampling(const Options& o) {
  g_csv = fopen(o.out.c_str(), "we");  // 'e': O_CLOEXEC, the command does not inherit it
  if (g_csv == nullptr) fail("cannot open '%s': %s", o.out.c_str(), strerror(errno));
  static char csv_buffer[1 << 20];
  setvbuf(g_csv, csv_buffer, _IOFBF, sizeof csv_buffer);

  int exec_status_fd = -1;
  if (!o.command.empty()) exec_status_fd = fork_command(const_cast<char**>(o.command.data()));
  install_signal_handlers();

  Device d = open_device(o.device, stderr);
  CUpti_Profiler_Host_Object* probe_host = host_create(d);

  // Metrics: an explicit list is validated strictly; a preset is resolved leniently.
  std::vector<std::string> names;
  std::vector<std::string> labels;
  if (!o.metrics.empty()) {
    validate_explicit(d, probe_host, o.metrics);
    names = o.metrics;
    labels.assign(names.size(), "");
  } else {
    const Resolved r = resolve_preset(d, *preset_by_name(o.preset));
    fprintf(stderr, "pm_sampler: preset '%s' on %s:\n", o.preset.c_str(), d.chip.c_str());
    for (const std::string& line : r.notes) fprintf(stderr, "%s\n", line.c_str());
    if (r.names.empty()) fail("no metric of preset '%s' is available on %s", o.preset.c_str(),
                              d.chip.c_str());
    names = r.names;
    labels = r.labels;
  }

  Sampler s;
  s.verbose = o.verbose;
  for (const std::string& n : names) s.metrics.push_back(n.c_str());
  s.values.assign(names.size(), 0.0);
  Config cfg = schedule(d, s.metrics, true);
  if (cfg.result != CUPTI_SUCCESS || cfg.passes != 1)
    fail("the metric list no longer schedules in one pass (%s)", describe_failure(cfg).c_str());
  s.host = cfg.host;

  fprintf(stderr, "pm_sampler: %zu metric(s), 1 pass, config image %zu bytes:\n", names.size(),
          cfg.image.size());
  for (size_t i = 0; i < names.size(); ++i) {
    const MetricInfo m = metric_info(probe_host, names[i].c_str());
    const std::string about =
        m.result == CUPTI_SUCCESS
            ? m.description + " (" + m.dim_unit + ")"
            : std::string("(properties: ") + cupti_result_name(m.result) + ")";
    fprintf(stderr, "  [%2zu] %s%s%s%s -- %s\n", i, names[i].c_str(),
            labels[i].empty() ? "" : " [", labels[i].c_str(), labels[i].empty() ? "" : "]",
            about.c_str());
  }
  host_destroy(probe_host);

  // Target side: enable on the device, configure, counter data image.
  auto en = PARAMS(CUpti_PmSampling_Enable_Params);
  en.deviceIndex = static_cast<size_t>(d.index);
  CUPTI_CALL(cuptiPmSamplingEnable(&en));
  s.obj = en.pPmSamplingObject;

  auto sc = PARAMS(CUpti_PmSampling_SetConfig_Params);
  sc.pPmSamplingObject = s.obj;
  sc.configSize = cfg.image.size();
  sc.pConfig = cfg.image.data();
  sc.hardwareBufferSize = o.hw_buffer_mb << 20;
  sc.samplingInterval = o.interval;
  sc.triggerMode = o.sysclk ? CUPTI_PM_SAMPLING_TRIGGER_MODE_GPU_SYSCLK_INTERVAL
                            : CUPTI_PM_SAMPLING_TRIGGER_MODE_GPU_TIME_INTERVAL;
  sc.hwBufferAppendMode = CUPTI_PM_SAMPLING_HARDWARE_BUFFER_APPEND_MODE_KEEP_OLDEST;
  CUPTI_CALL(cuptiPmSamplingSetConfig(&sc));

  auto sz = PARAMS(CUpti_PmSampling_GetCounterDataSize_Params);
  sz.pPmSamplingObject = s.obj;
  sz.pMetricNames = s.metrics.data();
  sz.numMetrics = s.metrics.size();
  sz.maxSamples = o.max_samples;
  CUPTI_CALL(cuptiPmSamplingGetCounterDataSize(&sz));
  s.image.assign(sz.counterDataSize, 0);
  reset_image(s);

  if (o.sysclk)
    fprintf(stderr, "pm_sampler: trigger SYS clock, one sample per %" PRIu64 " cycles\n",
            o.interval);
  else
    fprintf(stderr, "pm_sampler: trigger GPU time, interval %" PRIu64 " ns (%.0f samples/s)\n",
            o.interval, 1e9 / static_cast<double>(o.interval));
  fprintf(stderr, "pm_sampler: hardware buffer %zu MiB, counter data image %u samples "
                  "(%.1f MiB), decode every %u ms, output %s\n",
          o.hw_buffer_mb, o.max_samples, s.image.size() / 1048576.0, o.decode_ms, o.out.c_str());

  fputs("sample_start_ns,sample_end_ns", g_csv);
  for (const std::string& n : names) fprintf(g_csv, ",%s", n.c_str());
  fputc('\n', g_csv);

  auto start = PARAMS(CUpti_PmSampling_Start_Params);
  start.pPmSamplingObject = s.obj;
  CUPTI_CALL(cuptiPmSamplingStart(&start));
  print_clocks("at start");
  const uint64_t t_start = clock_ns(CLOCK_MONOTONIC);

  if (!o.command.empty()) {
    fprintf(stderr, "pm_sampler: running: %s\n", join_command(o.command).c_str());
    release_command(exec_status_fd, o.command[0]);
  } else {
    fprintf(stderr, "pm_sampler: sampling for %.3f s (SIGINT ends it early)\n", o.duration_s);
  }

  // Drain while the command runs.
  int child_status = 0;
  bool sampling = true;
  for (;;) {
    sleep_ms(o.decode_ms);
    if (sampling && !drain(s)) sampling = false;
    if (!o.command.empty()) {
      const pid_t w = waitpid(g_child, &child_status, WNOHANG);
      if (w == g_child) {
        g_child_reaped = true;
        g_forward_pid = 0;
        break;
      }
      if (w < 0 && errno != EINTR) fail("waitpid: %s", strerror(errno));
    } else if (g_signal != 0 ||
               clock_ns(CLOCK_MONOTONIC) - t_start >= static_cast<uint64_t>(o.duration_s * 1e9)) {
      break;
    }
  }
  const uint64_t t_end = clock_ns(CLOCK_MONOTONIC);
  print_clocks("at end");

  // Stop, then decode what is left (twice, a decode period apart, for late records).
  if (sampling) sampling = drain(s);
  auto stop = PARAMS(CUpti_PmSampling_Stop_Params);
  stop.pPmSamplingObject = s.obj;
  CUPTI_CALL(cuptiPmSamplingStop(&stop));
  if (sampling) {
    drain(s);
    sleep_ms(o.decode_ms);
    drain(s);
  }
  auto info = PARAMS(CUpti_PmSampling_GetCounterDataInfo_Params);
  info.pCounterDataImage = s.image.data();
  info.counterDataImageSize = s.image.size();
  CUPTI_CALL(cuptiPmSamplingGetCounterDataInfo(&info));
  const size_t incomplete_at_end = info.numPopulatedSamples > info.numCompletedSamples
                                       ? info.numPopulatedSamples - info.numCompletedSamples
                                       : 0;

  if (fflush(g_csv) != 0 || fclose(g_csv) != 0) {
    g_csv = nullptr;
    fail("writing '%s': %s", o.out.c_str(), strerror(errno));
  }
  g_csv = nullptr;

  auto dis = PARAMS(CUpti_PmSampling_Disable_Params);
  dis.pPmSamplingObject = s.obj;
  CUPTI_CALL(cuptiPmSamplingDisable(&dis));
  host_destroy(s.host);
  close_device(d);

  // Summary.
  const Stats& st = s.st;
  int exit_code = 0;
  if (!o.command.empty()) {
    if (WIFEXITED(child_status)) {
      exit_code = WEXITSTATUS(child_status);
      fprintf(stderr, "pm_sampler: command exited with status %d after %.3f s\n", exit_code,
              (t_end - t_start) / 1e9);
    } else if (WIFSIGNALED(child_status)) {
      exit_code = 128 + WTERMSIG(child_status);
      fprintf(stderr, "pm_sampler: command ended by signal %d after %.3f s\n",
              WTERMSIG(child_status), (t_end - t_start) / 1e9);
    }
  }
  const double span_s = st.samples > 0 ? (st.last_end - st.first_start) / 1e9 : 0.0;
  fprintf(stderr, "pm_sampler: %" PRIu64 " samples written to %s", st.samples, o.out.c_str());
  if (st.samples > 0)
    fprintf(stderr, ", %" PRIu64 " .. %" PRIu64 " ns (%.3f s, mean sample %.0f ns)",
            st.first_start, st.last_end, span_s, span_s * 1e9 / static_cast<double>(st.samples));
  fputc('\n', stderr);
  fprintf(stderr, "pm_sampler: %" PRIu64 " decodes (%.1f ms), evaluation and CSV %.1f ms, "
                  "at most %" PRIu64 " samples per decode, %" PRIu64
                  " full counter data image(s)\n",
          st.decodes, st.decode_ns / 1e6, st.evaluate_ns / 1e6, st.max_new, st.images_filled);
  fprintf(stderr, "pm_sampler: hardware buffer overflow: %s",
          st.hw_buffer_lost ? "YES, decoding failed and later samples are lost"
                            : (st.overflow_decodes > 0 ? "flagged" : "none"));
  if (st.overflow_decodes > 0) fprintf(stderr, " (%" PRIu64 " decodes)", st.overflow_decodes);
  fputc('\n', stderr);
  fprintf(stderr, "pm_sampler: gaps between samples (over half a sample): %" PRIu64
                  " (%.3f ms in all), overlaps: %" PRIu64 ", smaller discontinuities: %" PRIu64
                  "; incomplete samples dropped: %" PRIu64 " at image resets, %zu at the end",
          st.gaps, st.gap_ns / 1e6, st.overlaps, st.jitter, st.incomplete_dropped,
          incomplete_at_end);
  if (st.rewrites > 0) fprintf(stderr, "; %" PRIu64 " decodes rewrote the image", st.rewrites);
  if (st.stop_other > 0)
    fprintf(stderr, "; %" PRIu64 " decodes stopped for reason 'other'", st.stop_other);
  fputc('\n', stderr);
  const uint64_t host_ns = st.decode_ns + st.evaluate_ns;
  if (t_end > t_start && host_ns * 2 > t_end - t_start)
    fprintf(stderr, "pm_sampler: note: decoding and evaluation took %.0f%% of the run's time on "
                    "one CPU core; a longer --interval-ns lightens the sampler\n",
            100.0 * host_ns / (t_end - t_start));
  if (st.hw_buffer_lost) return exit_code != 0 ? exit_code : 3;
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  if (o.list) return run_list(o);
  return run_sampling(o);
}
