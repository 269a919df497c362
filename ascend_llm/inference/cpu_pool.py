"""The worker pool of the fused CPU layer (inference/fused_decode.py): C++ source compiled into its library, and the
thread count.

`Pool::run(threads, tasks, fn, ctx)` calls fn(ctx, i) for i in [0, tasks) on the calling thread and up to
threads - 1 persistent std::thread workers (started on first use, named fused_layer). Tasks are taken from one
atomic counter, so a worker that wakes late finds fewer tasks or none and the caller never waits for a sleeping
worker's share; idle workers spin 50 us, then sleep on a condvar. No OpenMP team: started from MindSpore's runtime
threads its parallel regions cost ~20 ms each (precision/cpu_kernel.py). Workers run with the caller's MXCSR
(MindSpore's threads may set flush-to-zero), so a task gives the same bits on any thread.
"""

from __future__ import annotations

import os

from ascend_llm.config.threads import available_cpus
from ascend_llm.errors import ConfigError

THREADS_ENV = "ASCEND_LLM_KERNEL_THREADS"
MAX_THREADS = 64  # the pool's limit (63 workers and the caller)

POOL_SOURCE = r"""
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <pthread.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
static inline unsigned fp_mode() { return _mm_getcsr(); }
static inline void set_fp_mode(unsigned m) { _mm_setcsr(m); }
#else
static inline void cpu_relax() {}
static inline unsigned fp_mode() { return 0; }
static inline void set_fp_mode(unsigned) {}
#endif

// Persistent workers (module docstring). The task counter is one 64-bit atomic, run id << 32 | next task: a worker
// takes task i of run r only by a compare-exchange that sees run r live, so it never runs a stale run's task. A call
// while another thread holds the pool (two kernels at once) runs its tasks serially; a forked child starts a new
// pool (the parent's workers do not exist there).
typedef void (*TaskFn)(void *ctx, int64_t task);

class Pool {
 public:
  static Pool &get() {
    static Pool *pool = new Pool();  // never destroyed: detached workers may still wait on it at exit
    if (pool->pid_ != getpid()) pool = new Pool();
    return *pool;
  }

  int workers() const { return workers_; }

  void run(int threads, int64_t tasks, TaskFn fn, void *ctx) {
    std::unique_lock<std::mutex> owner(run_mu_, std::defer_lock);
    if (threads <= 1 || tasks <= 1 || !owner.try_lock()) {
      for (int64_t i = 0; i < tasks; ++i) fn(ctx, i);
      return;
    }
    const uint32_t id = static_cast<uint32_t>(state_.load(std::memory_order_relaxed) >> 32) + 1;
    for (; workers_ < threads - 1 && workers_ < 63; ++workers_)
      std::thread(&Pool::loop, this, workers_, id - 1).detach();
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    tasks_.store(tasks, std::memory_order_relaxed);
    active_.store(threads - 1, std::memory_order_relaxed);
    mode_.store(fp_mode(), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(static_cast<uint64_t>(id) << 32);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(id);
    for (int spins = 0; done_.load(std::memory_order_acquire) < tasks; ++spins) {
      if (spins < 4096) cpu_relax(); else std::this_thread::yield();
    }
  }

 private:
  static constexpr int64_t SPIN_US = 50;

  void work(uint32_t id) {
    for (;;) {
      uint64_t v = state_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(v >> 32) != id) return;
      const int64_t task = static_cast<int64_t>(v & 0xffffffffu);
      if (task >= tasks_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), task);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(int index, uint32_t seen) {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "fused_layer");  // visible in top -H, /proc/PID/task/*/comm
#endif
    for (;;) {
      auto began = std::chrono::steady_clock::now();
      uint64_t s;
      for (int spins = 1; static_cast<uint32_t>((s = state_.load(std::memory_order_acquire)) >> 32) == seen; ++spins) {
        cpu_relax();
        if (spins % 64 || std::chrono::steady_clock::now() - began < std::chrono::microseconds(SPIN_US)) continue;
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        while (static_cast<uint32_t>(state_.load() >> 32) == seen) cv_.wait(lock);
        sleepers_.fetch_sub(1);
        began = std::chrono::steady_clock::now();
      }
      seen = static_cast<uint32_t>(s >> 32);
      if (index >= active_.load(std::memory_order_relaxed)) continue;
      const unsigned saved = fp_mode();
      set_fp_mode(mode_.load(std::memory_order_relaxed));
      work(seen);
      set_fp_mode(saved);
    }
  }

  pid_t pid_ = getpid();
  int workers_ = 0;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0}, tasks_{0};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void *> ctx_{nullptr};
  std::atomic<int> active_{0}, sleepers_{0};
  std::atomic<unsigned> mode_{0};
};

// Workers the pool of this process has started (tests).
extern "C" int PoolWorkers() { return Pool::get().workers(); }

// fn(i) for i in [0, tasks) on `threads` threads (Pool::run).
template <class F>
static void parallel(int threads, int64_t tasks, F &fn) {
  Pool::get().run(threads, tasks, [](void *c, int64_t i) { (*static_cast<F *>(c))(i); }, &fn);
}
"""


def kernel_threads(threads: int | None = None) -> int:
    """Threads of the fused layer: `threads` when given, else $ASCEND_LLM_KERNEL_THREADS, else min(2, CPUs this
    process may run on (sched_getaffinity)). ConfigError unless an integer in [1, 64]."""
    field, value = "threads", threads
    if value is None and os.environ.get(THREADS_ENV, "").strip():
        field, value = THREADS_ENV, os.environ[THREADS_ENV].strip()
    if value is None:
        return min(2, available_cpus())
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    wrong_type = isinstance(value, bool) or (field == "threads" and not isinstance(value, int))  # a str only from env
    if wrong_type or count < 1 or count > MAX_THREADS or str(count) != str(value).strip():
        raise ConfigError(field, value, f"an integer from 1 to {MAX_THREADS} (threads of the fused CPU layer)")
    return count
