// CPU emulation of the simt.h execution model (included by simt.h when it is compiled
// without nvcc).  It exists so that the CUDA kernels can be tested on machines without a GPU:
// the kernel source is the same, only the primitives below differ.
//
// A launch runs its blocks one after another.  A block's kThreads threads are cooperative
// fibers on the calling OS thread, each with its own stack.  A fiber runs until it reaches a
// barrier (sync_block, or the warp-level exchange inside shfl_down) and then yields; once
// every fiber waits, the barrier whose participants have all arrived is released.  Between
// two barriers the threads run in an order set by Options::schedule (ascending, descending,
// shuffled), so a missing barrier -- a thread reading shared memory another thread writes in
// the same phase -- changes the result with the schedule: the tests compare schedules bit
// for bit.  Checked as the kernels run, each failure ending the launch with a message:
//   * __syncthreads reached by only part of a block, shuffles with exited or diverged lanes
//     (deadlock), as on a GPU they hang or are undefined;
//   * every shared-memory index against its array and the block's dynamic allocation, and
//     the 16-byte alignment of vector accesses; shared memory starts filled with NaN bytes,
//     so a value read before it was written poisons the result;
//   * every global access against the buffers registered with a Session (out of bounds,
//     misaligned vector access, write to a read-only input).
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(FPM_EMU_UCONTEXT)
#define FPM_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#if !defined(FPM_EMU_USE_UCONTEXT)
// Switches stacks: saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, loads load_sp and restores the registers saved there (SysV x86-64).
// Weak: every translation unit that includes this header emits the same definition.
extern "C" void fpm_emu_switch(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".weak fpm_emu_switch\n"
    ".type fpm_emu_switch,@function\n"
    "fpm_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size fpm_emu_switch, .-fpm_emu_switch\n");
#endif

namespace fused_poolformer {
namespace simt {
namespace emu {

// A global-memory buffer the kernels may touch.
struct Buffer {
  uintptr_t begin = 0, end = 0;
  bool writable = false;
  std::string name;
};

struct Options {
  int schedule = 0;  // 0: threads (and blocks) in ascending order, 1: descending, 2: shuffled
  uint64_t seed = 1;
  size_t max_shared_bytes = 227 * 1024;
};

// The registered buffers and options of one emulated operator call (thread-local).
struct Session {
  Options options;
  std::vector<Buffer> buffers;
  int launches = 0;
  // Global accesses by width: 16-byte vectors and everything narrower.
  int64_t wide_loads = 0, narrow_loads = 0, wide_stores = 0, narrow_stores = 0;

  void add(const void* p, size_t bytes, bool writable, std::string name) {
    if (p == nullptr || bytes == 0) return;
    const auto b = reinterpret_cast<uintptr_t>(p);
    buffers.push_back(Buffer{b, b + bytes, writable, std::move(name)});
  }
};

inline Session*& current_session() {
  thread_local Session* session = nullptr;
  return session;
}

// Installs a session for the calling thread for the scope's lifetime.
struct SessionScope {
  explicit SessionScope(Session& s) { current_session() = &s; }
  ~SessionScope() { current_session() = nullptr; }
  SessionScope(const SessionScope&) = delete;
  SessionScope& operator=(const SessionScope&) = delete;
};

enum class State : uint8_t { Ready, AtBlockBarrier, AtWarpBarrier, Done };

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  State state = State::Ready;
#if defined(FPM_EMU_USE_UCONTEXT)
  ucontext_t context;
#else
  void* sp = nullptr;
#endif
};

// The block being run on this OS thread.
struct BlockRun {
  unsigned block = 0;
  int current = 0;  // the running thread
  Fiber fibers[kThreads];
  std::vector<std::unique_ptr<char[]>>* stacks = nullptr;
#if defined(FPM_EMU_USE_UCONTEXT)
  ucontext_t scheduler;
#else
  void* scheduler_sp = nullptr;
#endif
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  uint64_t exchange[kThreads];
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline BlockRun*& current_block() {
  thread_local BlockRun* run = nullptr;
  return run;
}

inline void switch_to_scheduler() {
  BlockRun& r = *current_block();
#if defined(FPM_EMU_USE_UCONTEXT)
  swapcontext(&r.fibers[r.current].context, &r.scheduler);
#else
  fpm_emu_switch(&r.fibers[r.current].sp, r.scheduler_sp);
#endif
}

// Ends the launch with `message` (the first failure wins).  Outside a kernel it throws.
[[noreturn]] inline void fail(const std::string& message) {
  BlockRun* r = current_block();
  if (r == nullptr) throw std::runtime_error(message);
  if (r->error.empty()) {
    r->error = "block " + std::to_string(r->block) + ", thread " + std::to_string(r->current) +
               ": " + message;
  }
  r->fibers[r->current].state = State::Done;
  switch_to_scheduler();
  std::abort();  // never resumed
}

inline void wait_at(State barrier) {
  BlockRun& r = *current_block();
  r.fibers[r.current].state = barrier;
  switch_to_scheduler();
}

extern "C" inline void fpm_emu_fiber_entry() {
  BlockRun& r = *current_block();
  (*r.body)();
  r.fibers[r.current].state = State::Done;
  switch_to_scheduler();
  std::abort();
}

inline void start_fiber(BlockRun& r, int t) {
  char* stack = (*r.stacks)[t].get();
  Fiber& f = r.fibers[t];
  f.state = State::Ready;
#if defined(FPM_EMU_USE_UCONTEXT)
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fpm_emu_fiber_entry), 0);
#else
  // A stack that fpm_emu_switch "returns" from into fpm_emu_fiber_entry: six zeroed
  // callee-saved registers, the entry address, and a fake return address that leaves the
  // stack pointer 16-byte aligned plus 8 at the entry, as after a call.
  auto top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;
  slots[-2] = reinterpret_cast<void*>(&fpm_emu_fiber_entry);
  for (int i = 3; i <= 8; ++i) slots[-i] = nullptr;
  f.sp = &slots[-8];
#endif
}

inline void resume(BlockRun& r, int t) {
  r.current = t;
#if defined(FPM_EMU_USE_UCONTEXT)
  swapcontext(&r.scheduler, &r.fibers[t].context);
#else
  fpm_emu_switch(&r.scheduler_sp, r.fibers[t].sp);
#endif
}

inline uint64_t next_random(uint64_t& state) {  // xorshift64*
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1Dull;
}

inline void make_order(int schedule, uint64_t& rng, int* order, int n) {
  for (int i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
  if (schedule == 2) {
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(rng) % (i + 1)]);
  }
}

inline std::string describe_states(const BlockRun& r) {
  int counts[4] = {0, 0, 0, 0};
  for (const Fiber& f : r.fibers) ++counts[static_cast<int>(f.state)];
  return std::to_string(counts[1]) + " threads at __syncthreads, " + std::to_string(counts[2]) +
         " at a warp shuffle, " + std::to_string(counts[3]) + " exited";
}

// Runs one block to completion; returns false (with r.error set) on a failure.
inline bool run_block(BlockRun& r, int schedule, uint64_t& rng) {
  for (int t = 0; t < kThreads; ++t) start_fiber(r, t);
  std::memset(r.shared, 0xFF, r.shared_bytes);  // NaN in every float type
  int order[kThreads];
  while (true) {
    make_order(schedule, rng, order, kThreads);
    for (int k = 0; k < kThreads; ++k) {
      if (r.fibers[order[k]].state == State::Ready) resume(r, order[k]);
      if (!r.error.empty()) return false;
    }
    bool released = false;
    for (int w = 0; w < kWarps; ++w) {
      int waiting = 0, done = 0;
      for (int l = 0; l < kWarpSize; ++l) {
        const State s = r.fibers[w * kWarpSize + l].state;
        waiting += s == State::AtWarpBarrier;
        done += s == State::Done;
      }
      if (waiting == kWarpSize) {
        for (int l = 0; l < kWarpSize; ++l) r.fibers[w * kWarpSize + l].state = State::Ready;
        released = true;
      } else if (waiting > 0 && done > 0) {
        r.error = "block " + std::to_string(r.block) + ": warp " + std::to_string(w) +
                  " shuffles while some of its lanes have exited";
        return false;
      }
    }
    if (released) continue;
    int at_block = 0, done = 0;
    for (const Fiber& f : r.fibers) {
      at_block += f.state == State::AtBlockBarrier;
      done += f.state == State::Done;
    }
    if (done == kThreads) return true;
    if (at_block == kThreads) {
      for (Fiber& f : r.fibers) f.state = State::Ready;
      continue;
    }
    r.error = "block " + std::to_string(r.block) + ": barrier deadlock (" + describe_states(r) +
              "): a __syncthreads or shuffle is not reached by all threads";
    return false;
  }
}

inline std::vector<std::unique_ptr<char[]>>& fiber_stacks() {
  thread_local std::vector<std::unique_ptr<char[]>> stacks;
  if (stacks.empty()) {
    for (int t = 0; t < kThreads; ++t) stacks.emplace_back(new char[kStackBytes]);
  }
  return stacks;
}

inline void run_grid(unsigned grid, size_t shared_bytes, const std::function<void()>& body) {
  Session* session = current_session();
  const Options options = session ? session->options : Options{};
  if (session) ++session->launches;
  if (shared_bytes > options.max_shared_bytes) {
    throw std::runtime_error("emulated launch asks for " + std::to_string(shared_bytes) +
                             " bytes of shared memory, more than the device's " +
                             std::to_string(options.max_shared_bytes));
  }
  auto run = std::make_unique<BlockRun>();
  std::vector<unsigned char> shared(shared_bytes + 16);
  run->stacks = &fiber_stacks();
  run->shared = shared.data();
  run->shared_bytes = shared_bytes;
  run->body = &body;
  uint64_t rng = options.seed * 0x9E3779B97F4A7C15ull + 1;
  BlockRun* outer = current_block();
  current_block() = run.get();
  for (unsigned k = 0; k < grid; ++k) {
    run->block = options.schedule == 1 ? grid - 1 - k : k;
    if (!run_block(*run, options.schedule, rng)) {
      current_block() = outer;
      throw std::runtime_error("emulated kernel failed: " + run->error);
    }
  }
  current_block() = outer;
}

inline void check_global(const void* p, size_t bytes, size_t alignment, bool write) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a % alignment != 0) {
    fail("global " + std::string(write ? "store" : "load") + " of " + std::to_string(bytes) +
         " bytes at a misaligned address");
  }
  Session* s = current_session();
  if (s == nullptr) return;
  for (const Buffer& b : s->buffers) {
    if (a >= b.begin && a + bytes <= b.end) {
      if (write && !b.writable) fail("global store into the read-only buffer " + b.name);
      int64_t& counter = write ? (bytes == 16 ? s->wide_stores : s->narrow_stores)
                               : (bytes == 16 ? s->wide_loads : s->narrow_loads);
      ++counter;
      return;
    }
  }
  fail("global " + std::string(write ? "store" : "load") + " of " + std::to_string(bytes) +
       " bytes outside every buffer of the call");
}

inline void check_shared(const void* data, int size, int index, int count, size_t bytes) {
  BlockRun* r = current_block();
  if (index < 0 || index + count > size) {
    fail("shared-memory index " + std::to_string(index) + " (+" + std::to_string(count) +
         ") outside an array of " + std::to_string(size));
  }
  const auto p = reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(index) * (bytes / count);
  if (r != nullptr) {
    const auto base = reinterpret_cast<uintptr_t>(r->shared);
    if (p < base || p + bytes > base + r->shared_bytes) fail("access past the dynamic shared memory");
  }
  if (count > 1 && p % bytes != 0) fail("misaligned shared-memory vector access");
}

}  // namespace emu

using Stream = int;
inline Stream to_stream(void*) { return 0; }

inline int thread_index() { return emu::current_block()->current; }
inline unsigned block_index() { return emu::current_block()->block; }
inline void sync_block() { emu::wait_at(emu::State::AtBlockBarrier); }
inline unsigned char* dynamic_shared_memory() { return emu::current_block()->shared; }

template <typename T>
inline T shfl_down(T value, int delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  emu::BlockRun& r = *emu::current_block();
  const int me = r.current, lane = me % kWarpSize;
  std::memcpy(&r.exchange[me], &value, sizeof(T));
  emu::wait_at(emu::State::AtWarpBarrier);
  T out = value;
  if (lane + delta < kWarpSize) std::memcpy(&out, &r.exchange[me + delta], sizeof(T));
  emu::wait_at(emu::State::AtWarpBarrier);  // nobody overwrites a slot still to be read
  return out;
}

template <typename T>
inline T load_global(const T* p) {
  emu::check_global(p, sizeof(T), alignof(T), false);
  T out;
  std::memcpy(&out, p, sizeof(T));
  return out;
}
template <typename T>
inline void store_global(T* p, T value) {
  emu::check_global(p, sizeof(T), alignof(T), true);
  std::memcpy(p, &value, sizeof(T));
}
template <int V, typename T>
inline Pack<T, V> load_global_vector(const T* p) {
  emu::check_global(p, sizeof(Pack<T, V>), sizeof(Pack<T, V>), false);
  Pack<T, V> out;
  std::memcpy(&out, p, sizeof(out));
  return out;
}
template <int V, typename T>
inline void store_global_vector(T* p, const Pack<T, V>& value) {
  emu::check_global(p, sizeof(Pack<T, V>), sizeof(Pack<T, V>), true);
  std::memcpy(p, &value, sizeof(value));
}

template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), unsigned grid, size_t smem_bytes, Stream,
                   Args&&... args) {
  const std::function<void()> body = [&]() { kernel(args...); };
  emu::run_grid(grid, smem_bytes, body);
}

}  // namespace simt
}  // namespace fused_poolformer
