// The CPU emulation of a CUDA launch behind kernels/simt.hpp.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread. The scheduler resumes the runnable
// fibers one at a time in a fixed order (ascending or descending thread index; blocks in the same order) and each
// runs until it reaches a synchronisation point: `__syncthreads` (released when every thread of the block waits at
// the same barrier), a warp exchange (shuffles, ballots, `__syncwarp`: released when every lane of the mask has
// deposited its value) or its end. Anything else is reported as an error instead of hanging: threads waiting at
// different barriers, a barrier some threads exited before reaching, lanes of a warp at different shuffles, a
// shuffle naming a lane that does not exist or has exited. Because the interleaving is fixed, a read of shared
// memory before the barrier that orders it reads the old value in one order and the new one in the other, and each
// warp runs as far ahead of the others as CUDA allows (see run_block).
#include "../kernels/simt.hpp"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace simt {
namespace {

enum class Wait { Runnable, Barrier, Warp, Done, Trapped };

struct Fiber {
  ucontext_t context;
  uint3 tid;
  unsigned linear = 0;
  Wait wait = Wait::Runnable;
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;
  unsigned exchanges = 0;  // warp exchanges so far: selects one of two slot buffers
};

// Fiber stacks: mmap'd with a guard page below each (an overflow faults instead of corrupting its neighbour).
struct Stacks {
  static constexpr size_t kSize = 256 * 1024;
  std::vector<char*> bases;
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  char* get(size_t i) {
    while (bases.size() <= i) {
      void* p = mmap(nullptr, kSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      mprotect(p, page, PROT_NONE);
      bases.push_back(static_cast<char*>(p));
    }
    return bases[i] + page;
  }
  ~Stacks() {
    for (char* b : bases) munmap(b, kSize + page);
  }
};

struct Launch {
  void (*entry)(void**) = nullptr;
  void** args = nullptr;
  dim3 grid, block;
  uint3 block_index{0, 0, 0};
  std::vector<unsigned char> shared;
  // Static shared arrays of the running block: (declaration site, bytes), made and poisoned at first use.
  std::vector<std::pair<const void*, std::vector<unsigned char>>> static_shared;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  uint64_t slots[32][2][32];
  std::string error;
};

thread_local Launch* active = nullptr;
thread_local Stacks stacks;

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + ")";
}

Launch& launch() {
  if (!active) {
    std::fprintf(stderr, "simt: a CUDA builtin was used outside an emulated launch\n");
    std::abort();
  }
  return *active;
}

void yield_to_scheduler() {
  Launch& l = launch();
  swapcontext(&l.current->context, &l.scheduler);
}

void fiber_main() {
  Launch& l = launch();
  l.entry(l.args);
  l.current->wait = Wait::Done;
  // returning resumes the scheduler through uc_link
}

// Releases the warp exchange the lanes of warp `w` wait at once every lane of its mask has arrived. Returns false
// with l.error set when the exchange can never complete (divergent lanes, a lane that exited or does not exist).
bool release_warp(Launch& l, size_t w, bool* released) {
  *released = false;
  const size_t n = l.fibers.size();
  size_t first = w * 32, lanes = std::min<size_t>(32, n - first);
  const Fiber* waiting = nullptr;
  for (size_t i = first; i < first + lanes && !waiting; ++i)
    if (l.fibers[i].wait == Wait::Warp) waiting = &l.fibers[i];
  if (!waiting) return true;
  unsigned mask = waiting->mask;
  bool all_arrived = true;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    if (lane >= lanes) {
      l.error = "warp exchange at " + site(waiting->file, waiting->line) + " names lane " + std::to_string(lane) +
                " of a warp with " + std::to_string(lanes) + " threads";
      return false;
    }
    const Fiber& f = l.fibers[first + lane];
    if (f.wait == Wait::Warp && (f.mask != mask || f.file != waiting->file || f.line != waiting->line)) {
      l.error = "divergent warp: " + thread_name(f) + " at " + site(f.file, f.line) + " while " +
                thread_name(*waiting) + " at " + site(waiting->file, waiting->line);
      return false;
    }
    if (f.wait == Wait::Done) {
      l.error = thread_name(f) + " exited before the warp exchange at " + site(waiting->file, waiting->line);
      return false;
    }
    if (f.wait != Wait::Warp) all_arrived = false;
  }
  if (all_arrived) {
    for (unsigned lane = 0; lane < lanes; ++lane)
      if (mask >> lane & 1u) l.fibers[first + lane].wait = Wait::Runnable;
    *released = true;
  }
  return true;
}

// Every fiber is blocked: releases the block barrier when all live threads wait at the same one; otherwise the block
// can never finish and l.error says why.
bool release_barrier(Launch& l) {
  const size_t n = l.fibers.size();
  size_t done = 0, at_barrier = 0;
  for (const Fiber& f : l.fibers) {
    done += f.wait == Wait::Done;
    at_barrier += f.wait == Wait::Barrier;
  }
  if (at_barrier > 0 && at_barrier + done == n) {
    const Fiber* first = nullptr;
    for (const Fiber& f : l.fibers) {
      if (f.wait != Wait::Barrier) continue;
      if (!first) first = &f;
      if (f.file != first->file || f.line != first->line) {
        l.error = "divergent __syncthreads: " + thread_name(*first) + " waits at " + site(first->file, first->line) +
                  ", " + thread_name(f) + " at " + site(f.file, f.line);
        return false;
      }
    }
    if (done > 0) {
      l.error = std::to_string(done) + " threads exited while " + std::to_string(at_barrier) +
                " wait at the __syncthreads at " + site(first->file, first->line);
      return false;
    }
    for (Fiber& f : l.fibers) f.wait = Wait::Runnable;
    return true;
  }
  std::string what = "threads wait for each other:";
  int described = 0;
  for (const Fiber& f : l.fibers) {
    if (f.wait == Wait::Done || described >= 3) continue;
    what += " " + thread_name(f) + (f.wait == Wait::Barrier ? " at __syncthreads " : " at a warp exchange ") +
            site(f.file, f.line) + ";";
    ++described;
  }
  l.error = what;
  return false;
}

// Warps take turns in `descending` or ascending order, each running as far as it can (through its own warp
// exchanges) before the next starts, so one warp is always far ahead of the others between block barriers: a
// reuse of shared memory that lacks a barrier is seen by the later warps. Inside a warp the lanes take turns in the
// same order between exchanges.
bool run_block(Launch& l, bool descending) {
  const size_t n = l.fibers.size();
  std::fill(l.shared.begin(), l.shared.end(), 0xff);  // uninitialised shared memory reads as NaN / -1
  l.static_shared.clear();                             // and so does static shared memory, per block
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    unsigned linear = unsigned(i);
    f.linear = linear;
    f.tid = uint3{linear % l.block.x, (linear / l.block.x) % l.block.y, linear / (l.block.x * l.block.y)};
    f.wait = Wait::Runnable;
    f.exchanges = 0;
    char* stack = stacks.get(i);
    if (!stack) {
      l.error = "out of memory for fiber stacks";
      return false;
    }
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack;
    f.context.uc_stack.ss_size = Stacks::kSize;
    f.context.uc_link = &l.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  const size_t warps = (n + 31) / 32;
  for (;;) {
    for (size_t k = 0; k < warps; ++k) {
      size_t w = descending ? warps - 1 - k : k;
      size_t first = w * 32, lanes = std::min<size_t>(32, n - first);
      for (bool released = true; released;) {
        for (size_t j = 0; j < lanes; ++j) {
          Fiber& f = l.fibers[first + (descending ? lanes - 1 - j : j)];
          if (f.wait != Wait::Runnable) continue;
          l.current = &f;
          swapcontext(&l.scheduler, &f.context);
          if (!l.error.empty()) return false;
        }
        if (!release_warp(l, w, &released)) return false;
      }
    }
    size_t done = 0;
    for (const Fiber& f : l.fibers) done += f.wait == Wait::Done;
    if (done == n) return true;
    if (!release_barrier(l)) return false;
  }
}

}  // namespace

const uint3& thread_idx() { return launch().current->tid; }
const uint3& block_idx() { return launch().block_index; }
const dim3& block_dim() { return launch().block; }
const dim3& grid_dim() { return launch().grid; }
void* dynamic_shared() { return launch().shared.data(); }

void* static_shared(const void* site, size_t bytes) {
  Launch& l = launch();
  for (auto& [at, array] : l.static_shared)
    if (at == site) return array.data();
  size_t total = l.shared.size() + bytes;
  for (const auto& entry : l.static_shared) total += entry.second.size();
  if (total > 48 * 1024) {
    l.error = "static and dynamic shared memory of " + std::to_string(total) + " bytes: more than the 48 KiB a block "
              "gets without opting in";
    l.current->wait = Wait::Trapped;
    yield_to_scheduler();
    std::abort();  // never resumed
  }
  l.static_shared.emplace_back(site, std::vector<unsigned char>(bytes, 0xff));
  return l.static_shared.back().second.data();
}
unsigned lane() { return launch().current->linear % 32; }

void syncthreads(const char* file, int line) {
  Fiber& f = *launch().current;
  f.wait = Wait::Barrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* file, int line) {
  Launch& l = launch();
  Fiber& f = *l.current;
  unsigned warp = f.linear / 32, me = f.linear % 32, buffer = f.exchanges++ & 1u;
  if (!(mask >> me & 1u)) {
    l.error = thread_name(f) + " takes part in the warp exchange at " + site(file, line) + " without being in its mask";
    f.wait = Wait::Trapped;
    yield_to_scheduler();
  }
  l.slots[warp][buffer][me] = value;
  f.wait = Wait::Warp;
  f.mask = mask;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
  return l.slots[warp][buffer];
}

void trap(const char* file, int line) {
  Launch& l = launch();
  l.error = thread_name(*l.current) + " trapped at " + site(file, line);
  l.current->wait = Wait::Trapped;
  yield_to_scheduler();
  std::abort();  // never resumed
}

}  // namespace simt

// Runs `entry(args)` as a grid of `grid` blocks of `block` threads with `shared_bytes` of dynamic shared memory.
// Returns 0, or 1 with a message in `error`.
extern "C" int kto_simt_launch(void (*entry)(void**), void** args, const unsigned* grid, const unsigned* block,
                               size_t shared_bytes, int descending, char* error, size_t error_len) {
  using namespace simt;
  Launch l;
  l.entry = entry;
  l.args = args;
  l.grid = dim3(grid[0], grid[1], grid[2]);
  l.block = dim3(block[0], block[1], block[2]);
  size_t threads = size_t(block[0]) * block[1] * block[2];
  size_t blocks = size_t(grid[0]) * grid[1] * grid[2];
  if (threads == 0 || threads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64)
    l.error = "invalid block (" + std::to_string(block[0]) + "," + std::to_string(block[1]) + "," +
              std::to_string(block[2]) + "): at most 1024 threads";
  else if (blocks == 0 || grid[0] > 2147483647u || grid[1] > 65535u || grid[2] > 65535u)
    l.error = "invalid grid (" + std::to_string(grid[0]) + "," + std::to_string(grid[1]) + "," +
              std::to_string(grid[2]) + ")";
  else if (shared_bytes > 48 * 1024)
    l.error = std::to_string(shared_bytes) + " bytes of dynamic shared memory: more than the 48 KiB a launch gets "
              "without opting in";
  if (l.error.empty()) {
    Launch* outer = active;
    active = &l;
    l.shared.assign(shared_bytes, 0);
    l.fibers.resize(threads);
    for (size_t k = 0; k < blocks && l.error.empty(); ++k) {
      size_t b = descending ? blocks - 1 - k : k;
      l.block_index = uint3{unsigned(b % grid[0]), unsigned((b / grid[0]) % grid[1]),
                            unsigned(b / (size_t(grid[0]) * grid[1]))};
      if (!run_block(l, descending != 0) && !l.error.empty()) {
        std::string where = "block (" + std::to_string(l.block_index.x) + "," + std::to_string(l.block_index.y) +
                            "," + std::to_string(l.block_index.z) + "): ";
        l.error = where + l.error;
      }
    }
    active = outer;
  }
  if (l.error.empty()) return 0;
  std::snprintf(error, error_len, "%s", l.error.c_str());
  return 1;
}
