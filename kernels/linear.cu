// The elementwise and reduction parts of a linear layer on feature-major [features, N]
// matrices, around cuBLAS products (CPU twin: src/engine/cpu/linear.rs):
//   linear_bias_act   y[o, n] = act(y[o, n] + b[o])           (after y = W x)
//   relu_mask         dy[i] = y[i] <= 0 ? 0 : dy[i]            (in place)
//   linear_bias_grad  db[o] += (float) sum_n dy[o, n]          (f64 sum in n order)
// Launch contracts: the elementwise kernels take block = LINEAR_BLOCK threads and any grid
// (grid-stride loops); linear_bias_grad takes one warp per row: block = LINEAR_BLOCK
// threads, grid = ceil(rows / (LINEAR_BLOCK / 32)). Its per-row sum is a fixed pattern
// (lane-strided partial sums, then a fixed shuffle tree), so it is deterministic.
//
// Self-contained (no #include) so that NVRTC compiles it as it is when nvcc is absent.

#define LINEAR_BLOCK 256

typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(LINEAR_BLOCK)
linear_bias_act(float* __restrict__ y, const float* __restrict__ b, unsigned rows,
                unsigned cols, int relu) {
    const u64 n = (u64)rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        float v = __fadd_rn(y[i], b[i / cols]);
        if (relu) v = fmaxf(v, 0.0f);
        y[i] = v;
    }
}

extern "C" __global__ void __launch_bounds__(LINEAR_BLOCK)
relu_mask(float* __restrict__ dy, const float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        if (y[i] <= 0.0f) dy[i] = 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(LINEAR_BLOCK)
linear_bias_grad(const float* __restrict__ dy, unsigned rows, unsigned cols,
                 float* __restrict__ db) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned row = blockIdx.x * (LINEAR_BLOCK / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const float* r = dy + (u64)row * cols;
    double acc = 0.0;
    for (unsigned j = lane; j < cols; j += 32) acc += (double)r[j];
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) db[row] = __fadd_rn(db[row], (float)acc);
}
