// A CUDA driver that runs tis's kernels on the CPU, for checking the CUDA backend on machines
// without a GPU. Built by scripts/cuda-emulator.sh as a `libcuda.so` that cudarc loads in place
// of NVIDIA's driver; the kernels are kernels/*.cu compiled as host C++ (include/ supplies the
// device surface they use), registered by name in kernel_registry.h.
//
// What it checks: the backend's orchestration (launch shapes, argument order and types, buffer
// sizes, shared-memory requests, the order of launches) and each kernel's arithmetic, block by
// block and thread by thread, with barriers and warp shuffles honoured. The tensor-core
// instructions that kernels issue as inline PTX (ldmatrix, mma.sync m16n8k16) are warp-wide
// exchanges here, each lane's registers read and written in the layouts of NVIDIA's PTX ISA
// document, so a kernel that puts a value in the wrong register fails here as on a GPU; sm_90a's
// wgmma reads its shared-memory operands where their descriptors say, in the same document's
// core-matrix layout (and an A in registers from the issuing lanes, as mma.sync's A fragment),
// when the kernel waits for it (TIS_CUDA_EMULATOR_CAPABILITY
// below 90 makes it a device without wgmma). Both sides rest on one reading of that document,
// which only a GPU run confirms; shared-memory proxy fences are not modelled. What it does not: the
// hardware's memory model, races, timing, the tensor cores' exact accumulation order, and
// anything about speed. A result from here is an emulator result, never a GPU result.
//
// Execution: a launch runs its blocks on a few host threads (TIS_CUDA_EMULATOR_THREADS, default
// 2), one block at a time per host thread. Each CUDA thread of a block is a fiber with its own
// stack, switched by `switch_stack` below (ucontext's swapcontext makes a system call per
// switch, which made the emulator several times slower). Fibers run in turn, every other block's
// last to first, until they reach a barrier (__syncthreads, or a warp-level one: __syncwarp, or
// inside a shuffle); a barrier opens when every live thread of its block (warp) has arrived. A
// round in which no fiber arrives, leaves or opens a barrier is a deadlock: the launch fails
// with CUDA_ERROR_LAUNCH_FAILED and says where.
//
// Memory: every device allocation ends at a page boundary followed by an inaccessible page, so
// a kernel reading or writing past the end of a buffer faults at once (the handler names the
// kernel, block, thread and buffer); fresh allocations and dynamic shared memory are filled with
// 0xFF bytes (NaN in f32 and f16), so a value read before it was written shows; a block's
// dynamic shared memory starts 128-byte aligned and is followed by a canary, checked when the
// block ends, so a write past the launch's size fails the launch. ldmatrix checks its rows'
// alignment. Allocations start 16-byte aligned (up to 15 bytes of padding before the
// guard page). Asynchronous copies (__pipeline_memcpy_async) check their size and alignment and
// land only when the thread waits for them (or, with TIS_CUDA_EMULATOR_EARLY_COPIES=1, at once:
// the two ends of the time a copy may take). Copies and memsets are bounds-checked against the
// allocation they touch. The device has
// TIS_CUDA_EMULATOR_MEMORY bytes (default 2 GiB, a small GPU, so that filling it stays cheap):
// an allocation past it fails with CUDA_ERROR_OUT_OF_MEMORY, as on a full GPU.
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "include/cuda_emulation.h"
#include "include/cuda_pipeline.h"
#include "kernel_registry.h"

// ---- Driver API types, as in cuda.h (only what the entry points below need).
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct Context* CUcontext;
typedef struct Module* CUmodule;
typedef struct FunctionState* CUfunction;
typedef struct Stream* CUstream;
typedef struct Event* CUevent;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

constexpr int ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8;
constexpr int ATTRIBUTE_MULTIPROCESSOR_COUNT = 16;
constexpr int ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97;
constexpr int FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;

// The device it poses as: an sm_90 part with H100's shared-memory limits (see
// optin_shared_bytes) and few multiprocessors, so that grid-stride launches stay small.
constexpr int MULTIPROCESSORS = 4;
constexpr unsigned DEFAULT_SHARED_BYTES = 48 * 1024;
constexpr unsigned MAX_THREADS_PER_BLOCK = 1024;
constexpr const char* DEVICE_NAME = "tis CUDA emulator on the CPU (not a GPU)";

struct Context {};
struct Module {};
struct Stream {};
struct Event {
    std::chrono::steady_clock::time_point at;
};
struct FunctionState {
    emu::Kernel kernel;
    unsigned max_dynamic_shared = DEFAULT_SHARED_BYTES;
};

namespace {

size_t env_size(const char* name, size_t fallback) {
    const char* value = getenv(name);
    return value && *value ? strtoull(value, nullptr, 10) : fallback;
}

// ---- Kernels by name.

std::unordered_map<std::string, FunctionState>& kernels() {
    static std::unordered_map<std::string, FunctionState> table;
    return table;
}

// ---- Device memory.

struct Allocation {
    char* base;   // the mapping: data, then one inaccessible page
    size_t span;  // bytes mapped
    size_t size;  // bytes asked for; the data ends where the guard page begins
};

std::mutex memory_lock;
std::map<uintptr_t, Allocation> allocations;  // by data start
size_t allocated = 0;
const size_t page = (size_t)sysconf(_SC_PAGESIZE);

size_t device_memory() { return env_size("TIS_CUDA_EMULATOR_MEMORY", (size_t)2 << 30); }

// The shared memory a block may have once its kernel allows it: an H100's 227 KB, or
// TIS_CUDA_EMULATOR_SHARED_OPTIN bytes (an A100 allows 166912, compute capability 8.6 and 8.9
// 101376).
unsigned optin_shared_bytes() {
    static const unsigned bytes = (unsigned)env_size("TIS_CUDA_EMULATOR_SHARED_OPTIN", 227 * 1024);
    return bytes;
}

// The compute capability it poses as, major · 10 + minor: an H100's 90, or
// TIS_CUDA_EMULATOR_CAPABILITY (86: no wgmma, whose kernels then take their mma.sync path).
int capability() {
    static const int value = (int)env_size("TIS_CUDA_EMULATOR_CAPABILITY", 90);
    return value;
}

// The allocation holding [ptr, ptr + bytes), if one does.
const Allocation* find_allocation(uintptr_t ptr, size_t bytes) {
    auto it = allocations.upper_bound(ptr);
    if (it == allocations.begin()) return nullptr;
    --it;
    return ptr + bytes <= it->first + it->second.size ? &it->second : nullptr;
}

bool in_device_memory(CUdeviceptr ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(memory_lock);
    return find_allocation(ptr, bytes) != nullptr;
}

// ---- Fibers and barriers.

// switch_stack(&saved, next): saves the callee-saved registers and the floating-point control
// words on the current stack, stores the stack pointer in `saved`, and resumes the stack
// `next` saved the same way (System V x86-64).
extern "C" void switch_stack(void** saved, void* next);
asm(R"(
    .text
    .globl switch_stack
    .type switch_stack, @function
switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size switch_stack, .-switch_stack
)");

// A stack on which switch_stack will start `entry` (which must never return): control
// words, six zeroed registers, then `entry` as the return address, 16-byte aligned as at a call.
void* new_stack(char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;  // alignment: `entry` starts with rsp ≡ 8 (mod 16), as after a call
    *--sp = (void*)entry;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    *--sp = nullptr;
    memcpy(sp, control, sizeof control);
    return sp;
}

constexpr size_t FIBER_STACK = 256 * 1024;
// What one lane may put in a warp-wide exchange: an mma.sync's operands, 40 bytes, are the most.
constexpr size_t WARP_SLOT_BYTES = 48;

// An asynchronous copy (__pipeline_memcpy_async) not yet carried out.
struct PendingCopy {
    void* dst;
    const void* src;
    size_t bytes, zero_fill;
};

// A wgmma not yet carried out: where its accumulators are (the issuing thread's registers), its
// N and operands, and whether it adds to the accumulators. The issuing thread's warp says which
// 16 rows of the 64 it holds.
struct PendingWgmma {
    float* d;
    int n;
    emu::WgmmaOperand a, b;
    bool accumulate;
    // A in registers (wgmma_rs): the issuing lane's rows g and g + 8 of its warp's 16, gathered
    // from its quad's registers at issue (the PTX ISA leaves them untouched until the wait).
    bool a_in_registers = false;
    float a_rows[2][16] = {};
};

struct Fiber {
    void* stack;
    uint3 thread;
    unsigned warp, lane;
    bool done;
    // The thread's asynchronous copies: issued since its last commit, and committed groups in
    // order. They land in shared memory only when __pipeline_wait_prior lets them, so that a
    // kernel reading a slab before waiting for it reads what was there before (NaN at first).
    // With TIS_CUDA_EMULATOR_EARLY_COPIES=1 they land at once instead, so that a copy issued
    // into a buffer other threads still read (before the barrier that retires it) spoils what
    // they read next.
    std::vector<PendingCopy> issued;
    std::vector<std::vector<PendingCopy>> committed;
    // The thread's wgmma operations, likewise: issued since its last wgmma.commit_group, and
    // committed groups in order, carried out when wgmma.wait_group lets them (reading the
    // operands' shared memory then, as the tensor cores may). Whether a wgmma.fence came since
    // the thread last waited for a group (after which it may have touched the accumulators).
    std::vector<PendingWgmma> wgmma_issued;
    std::vector<std::vector<PendingWgmma>> wgmma_committed;
    bool wgmma_fenced = false;
};

// One host thread's current block.
struct BlockRun {
    const FunctionState* function;
    void** params;
    uint3 block;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void* scheduler;
    unsigned alive = 0, arrived = 0;
    uint64_t generation = 0, progress = 0;
    std::vector<unsigned> warp_alive, warp_arrived;
    std::vector<uint64_t> warp_generation;
    std::vector<unsigned char> warp_slots;  // WARP_SLOT_BYTES a lane: what warp exchanges put
    std::vector<unsigned char> shared_buffer;  // the dynamic shared memory, then the canary
    unsigned char* shared = nullptr;
    size_t shared_bytes = 0;
    std::string failure;
};

thread_local BlockRun* run = nullptr;

// Stacks of MAX_THREADS_PER_BLOCK fibers, each above an inaccessible page; one per host thread,
// reused across launches.
struct StackArena {
    char* base;
    static constexpr size_t slot = FIBER_STACK + 4096;
    StackArena() {
        base = (char*)mmap(nullptr, slot * MAX_THREADS_PER_BLOCK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) abort();
        for (unsigned i = 0; i < MAX_THREADS_PER_BLOCK; ++i) mprotect(base + i * slot, 4096, PROT_NONE);
    }
    char* stack(unsigned i) const { return base + i * slot + 4096; }
};

std::mutex arena_lock;
std::vector<StackArena*> arenas;

StackArena* take_arena() {
    std::lock_guard<std::mutex> lock(arena_lock);
    if (arenas.empty()) return new StackArena();
    StackArena* a = arenas.back();
    arenas.pop_back();
    return a;
}

void return_arena(StackArena* a) {
    std::lock_guard<std::mutex> lock(arena_lock);
    arenas.push_back(a);
}

void yield() { switch_stack(&run->current->stack, run->scheduler); }

// Stops the block: the scheduler sees the failure and abandons its fibers.
[[noreturn]] void fail(const std::string& why) {
    if (run->failure.empty()) run->failure = why;
    for (;;) yield();
}

void open_barriers_after_exit(unsigned warp) {
    BlockRun& b = *run;
    if (b.arrived > 0 && b.arrived == b.alive) {
        b.arrived = 0;
        ++b.generation;
    }
    if (b.warp_arrived[warp] > 0 && b.warp_arrived[warp] == b.warp_alive[warp]) {
        b.warp_arrived[warp] = 0;
        ++b.warp_generation[warp];
    }
}

void fiber_main() {
    BlockRun& b = *run;
    b.function->kernel.invoke(b.function->kernel.function, b.params);
    Fiber& f = *b.current;
    if (!f.wgmma_issued.empty() || !f.wgmma_committed.empty())
        fail("the kernel ended with wgmma operations it never waited for (wgmma.wait_group)");
    f.done = true;
    --b.alive;
    --b.warp_alive[f.warp];
    ++b.progress;
    open_barriers_after_exit(f.warp);
    switch_stack(&f.stack, b.scheduler);  // never resumed
    abort();
}

void warp_barrier() {
    BlockRun& b = *run;
    unsigned w = b.current->warp;
    uint64_t generation = b.warp_generation[w];
    ++b.progress;
    if (++b.warp_arrived[w] == b.warp_alive[w]) {
        b.warp_arrived[w] = 0;
        ++b.warp_generation[w];
        return;
    }
    while (b.warp_generation[w] == generation) yield();
}

constexpr size_t SHARED_ALIGNMENT = 128, SHARED_CANARY_BYTES = 256;
constexpr unsigned char CANARY = 0xA5;

// Runs one block to completion; false (with run->failure set) if it failed.
bool run_block(BlockRun& b, StackArena& arena, uint3 block_dim) {
    unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    unsigned warps = (threads + 31) / 32;
    b.fibers.assign(threads, Fiber{});
    b.alive = threads;
    b.arrived = 0;
    b.warp_alive.assign(warps, 32);
    if (threads % 32) b.warp_alive[warps - 1] = threads % 32;
    b.warp_arrived.assign(warps, 0);
    b.warp_generation.assign(warps, 0);
    b.warp_slots.assign(warps * 32 * WARP_SLOT_BYTES, 0);
    memset(b.shared, 0xFF, b.shared_bytes);
    memset(b.shared + b.shared_bytes, CANARY, SHARED_CANARY_BYTES);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.thread = uint3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
        f.warp = t / 32;
        f.lane = t % 32;
        f.stack = new_stack(arena.stack(t), FIBER_STACK, fiber_main);
    }
    emu::block_idx = b.block;
    // Half the blocks run their threads last to first, so that a missing barrier shows whether
    // its reader comes before or after its writer.
    bool reverse = (b.block.x + b.block.y + b.block.z) % 2 == 1;
    while (b.alive > 0) {
        uint64_t before = b.progress;
        for (unsigned n = 0; n < threads; ++n) {
            Fiber& f = b.fibers[reverse ? threads - 1 - n : n];
            if (f.done) continue;
            b.current = &f;
            emu::thread_idx = f.thread;
            switch_stack(&b.scheduler, f.stack);
            if (!b.failure.empty()) return false;
        }
        if (b.progress == before && b.alive > 0) {
            b.failure = "deadlock: every live thread waits at a barrier that cannot open (" +
                        std::to_string(b.alive) + " of " + std::to_string(threads) +
                        " threads live, " + std::to_string(b.arrived) + " at __syncthreads)";
            return false;
        }
    }
    for (size_t i = 0; i < SHARED_CANARY_BYTES; ++i)
        if (b.shared[b.shared_bytes + i] != CANARY) {
            b.failure = "wrote past its " + std::to_string(b.shared_bytes) + " bytes of dynamic shared memory";
            return false;
        }
    return true;
}

// ---- Out-of-bounds accesses.

thread_local const char* faulting_kernel = nullptr;

void on_fault(int signal, siginfo_t* info, void*) {
    uintptr_t address = (uintptr_t)info->si_addr;
    char message[512];
    int n = snprintf(message, sizeof message, "\nCUDA emulator: invalid memory access at %#lx", (unsigned long)address);
    if (faulting_kernel && run && run->current) {
        n += snprintf(message + n, sizeof message - n, " by kernel %s, block (%u, %u, %u), thread (%u, %u, %u)",
                      faulting_kernel, run->block.x, run->block.y, run->block.z, run->current->thread.x,
                      run->current->thread.y, run->current->thread.z);
    }
    for (auto& [start, a] : allocations) {
        uintptr_t end = start + a.size;
        if (address >= end && address < end + page) {
            n += snprintf(message + n, sizeof message - n, ": %lu bytes past the end of a %lu-byte buffer at %#lx",
                          (unsigned long)(address - end), (unsigned long)a.size, (unsigned long)start);
            break;
        }
    }
    snprintf(message + n, sizeof message - n, "\n");
    (void)!write(2, message, strlen(message));
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(signal, &dfl, nullptr);
    raise(signal);
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction action {};
        action.sa_sigaction = on_fault;
        action.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &action, nullptr);
        sigaction(SIGBUS, &action, nullptr);
    });
}

CUresult launch(FunctionState& function, uint3 grid, uint3 block, unsigned shared_bytes, void** params) {
    unsigned threads = block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !threads || threads > MAX_THREADS_PER_BLOCK || block.z > 64 ||
        grid.y > 65535 || grid.z > 65535 || shared_bytes > function.max_dynamic_shared) {
        fprintf(stderr,
                "CUDA emulator: launch of %s refused: grid (%u, %u, %u), block (%u, %u, %u), %u bytes of dynamic "
                "shared memory (allowed %u)\n",
                function.kernel.name, grid.x, grid.y, grid.z, block.x, block.y, block.z, shared_bytes,
                function.max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    install_fault_handler();
    uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    unsigned workers = (unsigned)std::min<uint64_t>(env_size("TIS_CUDA_EMULATOR_THREADS", 2), blocks);
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::string failure;
    std::mutex failure_lock;
    auto work = [&] {
        StackArena* arena = take_arena();
        BlockRun b;
        b.function = &function;
        b.params = params;
        b.shared_buffer.resize(shared_bytes + SHARED_CANARY_BYTES + SHARED_ALIGNMENT);
        uintptr_t start = (uintptr_t)b.shared_buffer.data();
        b.shared = (unsigned char*)((start + SHARED_ALIGNMENT - 1) / SHARED_ALIGNMENT * SHARED_ALIGNMENT);
        b.shared_bytes = shared_bytes;
        run = &b;
        faulting_kernel = function.kernel.name;
        emu::block_dim = block;
        emu::grid_dim = grid;
        for (uint64_t i; !failed && (i = next++) < blocks;) {
            b.block = uint3{(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / grid.x / grid.y)};
            if (!run_block(b, *arena, block)) {
                std::lock_guard<std::mutex> lock(failure_lock);
                if (!failed.exchange(true))
                    failure = b.failure + " in block (" + std::to_string(b.block.x) + ", " +
                              std::to_string(b.block.y) + ", " + std::to_string(b.block.z) + ")";
            }
        }
        run = nullptr;
        faulting_kernel = nullptr;
        return_arena(arena);
    };
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (failed) {
        fprintf(stderr, "CUDA emulator: kernel %s failed: %s\n", function.kernel.name, failure.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

Context the_context;
Module the_module;

}  // namespace

// ---- The device surface of include/cuda_emulation.h.

namespace emu {

thread_local uint3 thread_idx, block_idx, block_dim, grid_dim;

void register_kernel(Kernel kernel) { kernels()[kernel.name] = FunctionState{kernel}; }

void sync_threads() {
    BlockRun& b = *run;
    uint64_t generation = b.generation;
    ++b.progress;
    if (++b.arrived == b.alive) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield();
}

// The warp barrier of an operation that names all 32 lanes (the only mask the kernels use).
void full_warp_barrier(const char* operation) {
    BlockRun& b = *run;
    unsigned alive = b.warp_alive[b.current->warp];
    if (alive != 32)
        fail(std::string(operation) + " with all 32 lanes named, in a warp of " + std::to_string(alive) +
             " live threads");
    warp_barrier();
}

void sync_warp() { full_warp_barrier("__syncwarp"); }

// A warp-wide exchange (`operation`, naming all 32 lanes): each lane puts `value` in its slot,
// and once all have, `read` sees the 32 slots and the calling lane's index; every lane has read
// before any puts a value of the next exchange.
template <typename V, typename Read> auto warp_exchange(const char* operation, const V& value, Read read) {
    static_assert(sizeof(V) <= WARP_SLOT_BYTES, "a lane's slot holds WARP_SLOT_BYTES");
    BlockRun& b = *run;
    Fiber& f = *b.current;
    V* slots = (V*)&b.warp_slots[f.warp * 32 * WARP_SLOT_BYTES];
    slots[f.lane] = value;
    full_warp_barrier(operation);
    auto result = read((const V*)slots, (int)f.lane);
    warp_barrier();
    return result;
}

float shuffle_xor(float value, int lane_mask) {
    return warp_exchange("__shfl_xor_sync", value,
                         [&](const float* slots, int lane) { return slots[lane ^ ((unsigned)lane_mask & 31)]; });
}

bool any_lane(bool predicate) {
    return warp_exchange("__any_sync", predicate, [](const bool* slots, int) {
        for (int lane = 0; lane < 32; ++lane)
            if (slots[lane]) return true;
        return false;
    });
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 as the PTX ISA lays it out: lanes 8i to
// 8i + 7 name the 8 rows (16 bytes each, 16-byte aligned) of matrix i, and lane l receives in
// register i the two halves of matrix i at row l / 4, columns 2·(l % 4) and 2·(l % 4) + 1, or
// transposed, at column l / 4, rows 2·(l % 4) and 2·(l % 4) + 1.
std::array<uint32_t, 4> ldmatrix_x4(const void* row, bool transposed) {
    if ((uintptr_t)row % 16) fail("ldmatrix of a row at " + std::to_string((uintptr_t)row) + ": rows must be 16-byte aligned");
    return warp_exchange("ldmatrix", row, [&](const void* const* rows, int lane) {
        auto at = [&](int matrix, int r, int c) {
            uint16_t v;
            memcpy(&v, (const char*)rows[8 * matrix + r] + 2 * c, 2);
            return (uint32_t)v;
        };
        std::array<uint32_t, 4> out;
        for (int i = 0; i < 4; ++i) {
            int a = lane / 4, b = 2 * (lane % 4);
            out[i] = transposed ? at(i, b, a) | at(i, b + 1, a) << 16 : at(i, a, b) | at(i, a, b + 1) << 16;
        }
        return out;
    });
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, d += a·b, with the PTX ISA's fragments
// (g = lane / 4, t = lane % 4; a register's lower half holds the lower column or row): A (16 × 16)
// register 0 holds row g, columns 2t and 2t + 1; register 1 row g + 8; registers 2 and 3 the
// same rows at columns 2t + 8 and 2t + 9. B (16 × 8) register 0 holds rows 2t and 2t + 1 of
// column g, register 1 rows 2t + 8 and 2t + 9. C (16 × 8, f32) holds row g at columns 2t and
// 2t + 1, then row g + 8 at the same columns. Products are exact in f32; the sum runs over k in
// order (the tensor cores' order may differ).
struct MmaOperands {
    uint32_t a[4], b[2];
};

inline float half_at(uint32_t pair, int upper) {
    return __half2float(__half{(uint16_t)(upper ? pair >> 16 : pair & 0xFFFF)});
}

std::array<float, 4> mma_m16n8k16(const std::array<float, 4>& c, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    MmaOperands mine;
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    return warp_exchange("mma.sync", mine, [&](const MmaOperands* lanes, int lane) {
        auto a_at = [&](int row, int k) {
            int reg = (row >= 8) + 2 * (k >= 8);
            return half_at(lanes[(row % 8) * 4 + (k % 8) / 2].a[reg], k % 2);
        };
        auto b_at = [&](int k, int col) { return half_at(lanes[col * 4 + (k % 8) / 2].b[k >= 8], k % 2); };
        std::array<float, 4> d = c;
        for (int i = 0; i < 4; ++i) {
            int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
            for (int k = 0; k < 16; ++k) d[i] += a_at(row, k) * b_at(k, col);
        }
        return d;
    });
}

// sm_90a's wgmma.mma_async.sync.aligned.m64nNk16.f32.f16.f16 with both operands in shared
// memory, in the PTX ISA's layouts: each operand is core matrices of 8 rows × 16 bytes (row r at
// byte 16r), the descriptor's `lbo` bytes apart along K and its `sbo` bytes apart per 8 rows (no
// swizzle, K-major); A has the warpgroup's 64 rows, B's rows are its N columns. Warp w of the
// warpgroup accumulates rows 16w to 16w + 15 as mma.sync's C tiles: d[4j + i] is row
// g + 8·(i / 2), column 8j + 2t + i % 2. The operation is queued on the thread and carried out
// when wgmma_wait releases its group, so that a kernel that reads its accumulators, or
// overwrites its operands, before waiting shows. The descriptor is decoded as the hardware
// would (its address bits must be those of the start the kernel names beside it).
struct Descriptor {
    uint32_t lbo, sbo, base_offset, swizzle;
};

Descriptor decode(uint64_t bits) {
    return Descriptor{(uint32_t)(bits >> 16 & 0x3FFF) << 4, (uint32_t)(bits >> 32 & 0x3FFF) << 4,
                      (uint32_t)(bits >> 49 & 7), (uint32_t)(bits >> 62)};
}

// The address bits are compared modulo 2^14 (units of 16 bytes): a block's shared variables are
// host thread-locals here, whose addresses' low 18 bits, unlike a GPU's shared addresses (below
// 228 KB), may carry into the reserved bits 14-15 when a kernel adds an offset to a descriptor.
void check_operand(const char* which, const WgmmaOperand& m) {
    const Descriptor d = decode(m.descriptor);
    const uintptr_t start = (uintptr_t)m.start;
    if (start % 16) fail(std::string("wgmma operand ") + which + " starts at a shared address not 16-byte aligned");
    if (((m.descriptor & 0xFFFF) - (start >> 4)) % (1 << 14) != 0)
        fail(std::string("wgmma operand ") + which + ": its descriptor's address is not the start the kernel names");
    if (d.swizzle || d.base_offset || m.descriptor >> 46 & 7 || m.descriptor >> 52 & 0x3FF || m.descriptor >> 30 & 3)
        fail(std::string("wgmma operand ") + which + ": a descriptor with swizzling, a base offset or stray bits");
    if (d.lbo == 0 || d.sbo == 0) fail(std::string("wgmma operand ") + which + ": lbo or sbo of 0");
}

// What every wgmma.mma_async requires of its launch, its N, its B operand and its thread.
void check_wgmma(int n, const WgmmaOperand& b) {
    if (capability() < 90)
        fail("wgmma on a GPU of compute capability " + std::to_string(capability()) + " (sm_90a only)");
    if (block_dim.x % 128 || block_dim.y * block_dim.z != 1)
        fail("wgmma in a block that is not whole warpgroups along x (" + std::to_string(block_dim.x) + " threads)");
    if (n % 8 || n < 8 || n > 256) fail("wgmma with N = " + std::to_string(n));
    check_operand("B", b);
    if (!run->current->wgmma_fenced)
        fail("wgmma.mma_async without a wgmma.fence since the thread last waited for a group");
}

void wgmma_ss(float* d, int n, WgmmaOperand a, WgmmaOperand b, bool accumulate) {
    check_wgmma(n, b);
    check_operand("A", a);
    full_warp_barrier("wgmma.mma_async");
    run->current->wgmma_issued.push_back(PendingWgmma{d, n, a, b, accumulate});
}

// The same with A in registers: each lane's four hold its warp's 16 rows as mma.sync's A
// fragment does (register 0 row g, columns 2t and 2t + 1; 1 row g + 8; 2 and 3 those rows at
// columns 2t + 8 and 2t + 9).
void wgmma_rs(float* d, int n, const uint32_t (&a)[4], WgmmaOperand b, bool accumulate) {
    check_wgmma(n, b);
    PendingWgmma op{d, n, {}, b, accumulate};
    op.a_in_registers = true;
    MmaOperands mine{};
    memcpy(mine.a, a, sizeof mine.a);
    warp_exchange("wgmma.mma_async", mine, [&](const MmaOperands* lanes, int lane) {
        for (int h = 0; h < 2; ++h)
            for (int k = 0; k < 16; ++k)
                op.a_rows[h][k] = half_at(lanes[lane / 4 * 4 + (k % 8) / 2].a[h + 2 * (k >= 8)], k % 2);
        return 0;
    });
    run->current->wgmma_issued.push_back(op);
}

void wgmma_fence() {
    full_warp_barrier("wgmma.fence");
    run->current->wgmma_fenced = true;
}

void wgmma_commit() {
    full_warp_barrier("wgmma.commit_group");
    Fiber& f = *run->current;
    f.wgmma_committed.push_back(std::move(f.wgmma_issued));
    f.wgmma_issued.clear();
}

float core_matrix_value(const WgmmaOperand& m, const Descriptor& d, int row, int k) {
    const char* at = (const char*)m.start + row / 8 * d.sbo + k / 8 * d.lbo + row % 8 * 16 + k % 8 * 2;
    uint16_t bits;
    memcpy(&bits, at, 2);
    return half_at(bits, 0);
}

void wgmma_wait(int groups) {
    full_warp_barrier("wgmma.wait_group");
    Fiber& f = *run->current;
    const int g = f.lane / 4, t = f.lane % 4, row0 = 16 * (f.warp % 4);
    while ((int)f.wgmma_committed.size() > groups) {
        for (const PendingWgmma& op : f.wgmma_committed.front()) {
            // The lane's rows g and g + 8 of A, then each of its columns of B, read once.
            const Descriptor da = decode(op.a.descriptor), db = decode(op.b.descriptor);
            float a[2][16], b[16];
            for (int h = 0; h < 2; ++h)
                for (int k = 0; k < 16; ++k)
                    a[h][k] = op.a_in_registers ? op.a_rows[h][k] : core_matrix_value(op.a, da, row0 + g + 8 * h, k);
            for (int j = 0; j < op.n / 8; ++j)
                for (int c = 0; c < 2; ++c) {
                    for (int k = 0; k < 16; ++k) b[k] = core_matrix_value(op.b, db, 8 * j + 2 * t + c, k);
                    for (int h = 0; h < 2; ++h) {
                        float& d = op.d[4 * j + 2 * h + c];  // row g + 8h, column 8j + 2t + c
                        float sum = op.accumulate ? d : 0.f;
                        for (int k = 0; k < 16; ++k) sum += a[h][k] * b[k];
                        d = sum;
                    }
                }
        }
        f.wgmma_committed.erase(f.wgmma_committed.begin());
    }
    f.wgmma_fenced = false;
}

void* dynamic_shared() { return run->shared; }

void land(const PendingCopy& c) {
    memcpy(c.dst, c.src, c.bytes - c.zero_fill);
    memset((char*)c.dst + c.bytes - c.zero_fill, 0, c.zero_fill);
}

void pipeline_copy(void* dst, const void* src, size_t bytes, size_t zero_fill) {
    if ((bytes != 4 && bytes != 8 && bytes != 16) || zero_fill > bytes)
        fail("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes, " + std::to_string(zero_fill) +
             " zero-filled: the size must be 4, 8 or 16 and the zero fill at most the size");
    if ((uintptr_t)dst % bytes || (uintptr_t)src % bytes)
        fail("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes from " + std::to_string((uintptr_t)src) +
             " to " + std::to_string((uintptr_t)dst) + ": both must be aligned to the size");
    // Read once: the mode of the whole process.
    static const bool early = env_size("TIS_CUDA_EMULATOR_EARLY_COPIES", 0) != 0;
    PendingCopy copy{dst, src, bytes, zero_fill};
    if (early) land(copy);
    else run->current->issued.push_back(copy);
}

void pipeline_commit() {
    Fiber& f = *run->current;
    f.committed.push_back(std::move(f.issued));
    f.issued.clear();
}

void pipeline_wait_prior(size_t pending) {
    Fiber& f = *run->current;
    while (f.committed.size() > pending) {
        for (const PendingCopy& c : f.committed.front()) land(c);
        f.committed.erase(f.committed.begin());
    }
}

}  // namespace emu

// ---- Driver entry points (the subset cudarc calls for tis).

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }

CUresult cuDriverGetVersion(int* version) {
    *version = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
    *count = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int length, CUdevice) {
    if (length <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)length, "%s", DEVICE_NAME);
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = device_memory();
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
    case ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = MULTIPROCESSORS; break;
    case ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = capability() / 10; break;
    case ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = capability() % 10; break;
    case ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = DEFAULT_SHARED_BYTES; break;
    case ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = (int)optin_shared_bytes(); break;
    default: *value = 0;  // features it does not have (memory pools, ...)
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice) {
    *context = &the_context;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* context) {
    *context = &the_context;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* device) {
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

// Work runs when submitted, so streams and events only keep time.
CUresult cuStreamCreate(CUstream* stream, unsigned) {
    *stream = new Stream;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned flags, int) { return cuStreamCreate(stream, flags); }
CUresult cuStreamDestroy_v2(CUstream stream) {
    delete stream;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuEventCreate(CUevent* event, unsigned) {
    *event = new Event{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent event) {
    delete event;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent event, CUstream) {
    event->at = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> lock(memory_lock);
    *total = device_memory();
    *free = *total > allocated ? *total - allocated : 0;
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(memory_lock);
    if (bytes > device_memory() - std::min(allocated, device_memory())) return CUDA_ERROR_OUT_OF_MEMORY;
    size_t span = (bytes + page - 1) / page * page + page;
    char* base = (char*)mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect(base + span - page, page, PROT_NONE);
    // As close to the guard page as the 16-byte alignment the kernels' vector loads rely on
    // allows (the driver's is 256): a read past the end faults unless it stays in that padding.
    char* data = base + span - page - (bytes + 15) / 16 * 16;
    memset(data, 0xFF, bytes);
    allocations[(uintptr_t)data] = Allocation{base, span, bytes};
    allocated += bytes;
    *ptr = (CUdeviceptr)data;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    std::lock_guard<std::mutex> lock(memory_lock);
    auto it = allocations.find(ptr);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    munmap(it->second.base, it->second.span);
    allocated -= it->second.size;
    allocations.erase(it);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    if (!in_device_memory(dst, bytes)) return CUDA_ERROR_INVALID_VALUE;
    memcpy((void*)dst, src, bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    if (!in_device_memory(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    memcpy(dst, (const void*)src, bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (!in_device_memory(dst, bytes) || !in_device_memory(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
    memmove((void*)dst, (const void*)src, bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
    if (!in_device_memory(dst, count)) return CUDA_ERROR_INVALID_VALUE;
    memset((void*)dst, value, count);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t count, CUstream) {
    return cuMemsetD8_v2(dst, value, count);
}

CUresult cuModuleLoadData(CUmodule* module, const void*) {
    *module = &the_module;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* function, CUmodule, const char* name) {
    auto it = kernels().find(name);
    if (it == kernels().end()) return CUDA_ERROR_NOT_FOUND;
    *function = &it->second;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction function, int attribute, int value) {
    if (attribute == FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (value < 0 || (unsigned)value > optin_shared_bytes()) return CUDA_ERROR_INVALID_VALUE;
        function->max_dynamic_shared = (unsigned)value;
    }
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction function) {
    *value = attribute == FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES ? (int)function->max_dynamic_shared : 0;
    return CUDA_SUCCESS;
}

// Blocks of a kernel one multiprocessor holds at once, as the driver counts them from threads and
// shared memory (an H100's 2048 threads, 32 blocks and 228 KB a multiprocessor, 1 KB of it
// reserved a block); the emulator knows no register counts, so they limit nothing here.
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, CUfunction function, int block_size,
                                                              size_t dynamic_shared, unsigned) {
    if (!function || block_size <= 0 || block_size > 1024) return CUDA_ERROR_INVALID_VALUE;
    const size_t per_block = dynamic_shared + 1024, per_multiprocessor = optin_shared_bytes() + 1024;
    *blocks = (int)std::min(std::min<size_t>(32, 2048 / block_size), per_multiprocessor / per_block);
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared_bytes, CUstream, void** params, void** extra) {
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_INVALID_VALUE;  // tis passes arguments through `params` only
    return launch(*function, uint3{gx, gy, gz}, uint3{bx, by, bz}, shared_bytes, params);
}

// The driver's own names and descriptions of the errors the emulator returns.
struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
const ErrorText error_texts[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
};

const ErrorText* error_text(CUresult error) {
    for (const ErrorText& e : error_texts)
        if (e.code == error) return &e;
    return nullptr;
}

CUresult cuGetErrorName(CUresult error, const char** name) {
    const ErrorText* e = error_text(error);
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *name = e->name;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char** text) {
    const ErrorText* e = error_text(error);
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *text = e->text;
    return CUDA_SUCCESS;
}

}  // extern "C"
