#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace steelattn::cpu {
namespace {

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// Waiting: workers and the caller first spin for a short while (kSpin), then sleep on a
// condition variable. A decode step makes two parallel regions tens of microseconds apart,
// layer after layer; waking a sleeping worker costs about as much as the work (on the
// 2-core CI VM, a B1 step on two threads took twice its one-thread time), while a worker
// still spinning picks the next region up at once. torch's OpenMP threads spin after their
// regions the same way (longer).
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() or kSpin has passed; returns pred().
template <class Pred>
bool spin_until(Pred pred) {
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > end) return pred();
  }
}

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t n, int threads, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> call(call_mu_);  // one parallel region at a time
    threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
    if (threads == 1) {
      for (int64_t t = 0; t < n; ++t) fn(ctx, t, 0);
      return;
    }
    ensure_workers(threads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      next_.store(0);
      active_ = threads - 1;
      pending_.store(threads - 1);
      generation_.fetch_add(1);  // after the fields: a spinning worker that sees it sees them
    }
    cv_.notify_all();
    drain(0);
    if (spin_until([&] { return pending_.load() == 0; })) return;
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_.load() == 0; });
  }

 private:
  void drain(int thread) {
    for (int64_t t; (t = next_.fetch_add(1)) < n_;) fn_(ctx_, t, thread);
  }

  void ensure_workers(int count) {
    while (int(workers_.size()) < count) {
      const int id = int(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return stop_.load() || generation_.load() != seen; });
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_.load() || generation_.load() != seen; });
      if (stop_) return;
      seen = generation_.load();
      const bool take = id <= active_;
      lk.unlock();
      if (take) {
        drain(id);
        if (pending_.fetch_sub(1) == 1) {  // the last one: wake the caller if it went to sleep
          std::lock_guard<std::mutex> g(mu_);
          done_cv_.notify_one();
        }
      }
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> generation_{0};
  int active_ = 0;
  std::atomic<int> pending_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
};

Pool& pool() {
  static Pool p;
  return p;
}

struct Scratch {
  std::unique_ptr<float, AlignedFree> data;
  size_t floats = 0;
};
std::mutex scratch_mu;
std::vector<std::unique_ptr<Scratch>> scratches;

}  // namespace

void parallel_for(int64_t n, int threads, TaskFn fn, void* ctx) {
  if (n <= 0) return;
  pool().run(n, threads, fn, ctx);
}

int default_threads() { return int(std::max(1u, std::thread::hardware_concurrency())); }

float* thread_scratch(int thread, size_t floats) {
  Scratch* s;
  {
    std::lock_guard<std::mutex> lk(scratch_mu);
    while (int(scratches.size()) <= thread) scratches.push_back(std::make_unique<Scratch>());
    s = scratches[size_t(thread)].get();
  }
  if (s->floats < floats) {
    const size_t bytes = ((floats * sizeof(float)) + 63) / 64 * 64;
    s->data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    s->floats = s->data ? floats : 0;
  }
  return s->data.get();
}

}  // namespace steelattn::cpu
