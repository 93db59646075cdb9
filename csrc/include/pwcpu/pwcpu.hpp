// pwcpu: pointwise (1x1) convolution on the CPU.
//
// The C++ interface below has no Python dependency; the Python module is a thin binding over it.
// Tensors are NHWC float32 with the channel axis contiguous; every other stride is free (in
// elements, negative allowed), so crops, strided views and channel slices of larger buffers work
// without copies.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace pwcpu {

enum class Activation : int { none = 0, relu, relu6, silu, gelu, hardswish, sigmoid, hardsigmoid };
constexpr Activation kLastActivation = Activation::hardsigmoid;

// What a 1x1 convolution multiplies. fp32: float32 inputs and weights. bf16: inputs and weights
// rounded to bfloat16 (to nearest, ties to even; the weights once, when packed, the inputs as they
// are read), products summed in float32; bias, residual, activation and output stay float32.
// int8: dynamic quantization (NHWC only). Weights quantized once, per output channel, to symmetric
// int8; each input pixel's channels quantized as they are read, to int8 with a scale and zero
// point of the pixel's own (its range, 0 included, over 255 steps); exact integer sums; the
// float32 result dequantized with bias, residual and activation fused.
enum class Precision : int { fp32 = 0, bf16 = 1, int8 = 2 };

// Memory order of activations. NHWC: channels last (the kernels' native order). NCHW: each image
// is C planes of H x W, computed directly as W[K, C] x X[C, H*W].
enum class Layout : int { nhwc = 0, nchw = 1 };

// A 4-D view: data + shape + element strides, in the layout's axis order. NHWC: strides[3]
// (channels) must be 1 unless there is one channel. NCHW: out and residual need contiguous (H, W)
// planes; x may have any strides.
template <class T>
struct BasicTensorView {
    T* data = nullptr;
    int64_t shape[4] = {0, 0, 0, 0};
    int64_t strides[4] = {0, 0, 0, 1};
};
using TensorView = BasicTensorView<float>;
// 8-bit quantized values (uint8, or int8 seen as their bytes), NHWC.
using QuantizedView = BasicTensorView<uint8_t>;
// bfloat16 values (their bits: the high half of the float32 they stand for), NHWC.
using BFloat16View = BasicTensorView<uint16_t>;

// Static int8, as ONNX QLinearConv (1x1): x, weight and y are 8-bit integers with scales and zero
// points (real = scale * (q - zero_point)), bias int32 in units of x_scale * weight_scale,
//   acc = bias[k] + sum_c (x[c] - x_zero_point) (w[k][c] - w_zero_point[k])   (exact, int32)
//   y = clamp(round_to_nearest_even(float(acc) * (x_scale * w_scale[k] / y_scale)) + y_zero_point)
// in float32 as ONNX Runtime computes it, clamped to y's type. Padding reads x_zero_point.
struct QuantizedConvParams {
    const void* weight = nullptr;  // K rows of C / groups values, contiguous
    bool weight_signed = true;     // int8, else uint8
    const float* weight_scale = nullptr;          // K values
    const int32_t* weight_zero_point = nullptr;   // K values
    const int32_t* bias = nullptr;                // K values, or null
    float x_scale = 1.0f;
    int32_t x_zero_point = 0;
    bool x_signed = false;
    float y_scale = 1.0f;
    int32_t y_zero_point = 0;
    bool y_signed = false;
};

// Thrown when a buffer cannot be allocated (a std::bad_alloc whose what() names the buffer).
// Sizes that do not even fit in 64 bits throw std::length_error instead.
class AllocationError : public std::bad_alloc {
public:
    explicit AllocationError(std::string message) : message_(std::move(message)) {}
    const char* what() const noexcept override { return message_.c_str(); }

private:
    std::string message_;
};

// Memory for large tensors, as pwcpu allocates its packed weights and (from Python and PyTorch)
// its outputs: 64-byte aligned, huge pages asked for from 2 MiB, and the last few freed blocks of
// each kind (8, 256 MiB in all) kept for the next requests of a similar size, the most recent
// first, so that a layer called in a loop, or a model's layers in turn, reuse memory that is
// mapped and in cache instead of faulting in fresh pages on every call.
// allocate_buffer throws AllocationError (naming `what`); free_buffer takes the requested size.
enum class BufferKind { packed_weights, output };
void* allocate_buffer(size_t bytes, BufferKind kind, const char* what);
void free_buffer(void* p, size_t bytes, BufferKind kind);
int64_t reused_buffers(BufferKind kind);  // requests served so far from kept blocks

// Output extent of a convolution along one axis: (in + 2 pad - kernel) / stride + 1, 0 when the
// padded input is shorter than the kernel.
int64_t conv_output_size(int64_t in, int64_t pad, int64_t stride, int64_t kernel = 1);

// Copies `src`, an NHWC view of any strides (an NCHW tensor's memory seen as NHWC has its channels
// H * W apart), into `dst`: N * H * W * C floats, contiguous NHWC, which every operator reads in
// place. Threaded for large views.
void copy_to_nhwc(const TensorView& src, float* dst);

// Interleaves the channels of `count` NHWC views of one shape (N, H, W, C; any strides) into `dst`:
// N * H * W * (count * C) floats, contiguous NHWC, whose channel i * count + g is source g's
// channel i. That is ShuffleNet's channel shuffle of the sources' concatenation, in one pass.
// Threaded for large views.
void interleave_channels(const TensorView* sources, int count, float* dst);

// out[n * C + c]: the mean of channel c of image n of the NHWC view `x` (any strides) over its
// H * W pixels (global average pooling); NaN where there are no pixels, as 0 / 0 gives.
void channel_means(const TensorView& x, float* out);

struct ConvGeometry {
    int64_t stride_h = 1, stride_w = 1;
    int64_t pad_h = 0, pad_w = 0;  // zero padding, as in PyTorch
};

// Weights (and bias) packed for the kernel of the ISA active at construction: per group, NR-wide
// panels of output channels, each panel starting with its NR biases followed by C x NR weights.
class PackedWeights {
public:
    // weight: K rows of C/groups values, element strides (row_stride, col_stride).
    // bias: K values or nullptr.
    PackedWeights(const float* weight, int64_t out_channels, int64_t in_channels_per_group,
                  int64_t row_stride, int64_t col_stride, const float* bias, int64_t groups,
                  Layout layout = Layout::nhwc, Precision precision = Precision::fp32);
    // Static int8 weights (precision int8, NHWC), for run_quantized. Throws std::invalid_argument
    // for scales that are not finite and positive, or zero points outside their type's range.
    PackedWeights(const QuantizedConvParams& params, int64_t out_channels, int64_t in_channels_per_group,
                  int64_t groups);
    ~PackedWeights();
    PackedWeights(const PackedWeights&) = delete;
    PackedWeights& operator=(const PackedWeights&) = delete;

    int64_t out_channels() const;
    int64_t in_channels() const;  // C = groups * C/groups
    int64_t groups() const;
    Layout layout() const;
    Precision precision() const;
    // Name of the ISA whose kernel the packing was made for ("scalar", "avx2", "avx512", and for bf16
    // and int8 also "avx512bf16", "avx512vnni", "avx512amx"). Usually the family's ISA; int8 layers
    // of few channels per group on AMX take the VNNI kernels (AMX would pad their reduction).
    const char* isa() const;
    const char* kernel_name() const;
    // False once select_isa() has switched the kernels of this packing's family: pack again.
    bool current() const;

    // (N, Ho, Wo, K) for x (N, H, W, C), or (N, K, Ho, Wo) for x (N, C, H, W) in NCHW:
    // Ho = (H + 2 pad_h - 1) / stride_h + 1.
    std::array<int64_t, 4> output_shape(const TensorView& x, const ConvGeometry& geometry) const;

    // out = act(conv(x) + bias + residual). residual may be null, or alias out exactly (any other
    // overlap of out with an input is the caller's error). Throws std::invalid_argument for
    // mismatched shapes or a non-contiguous channel axis. Thread-safe: concurrent runs are fine.
    void run(const TensorView& x, const TensorView& out, const TensorView* residual,
             const ConvGeometry& geometry, Activation activation) const;
    // As run(), for bfloat16 x, read as it is by the bf16 kernels that take bfloat16 activations
    // (precision bf16, NHWC, on CPUs with a bfloat16 dot product or AMX): reads_bfloat16().
    // Elsewhere x is to be widened to float32 and run() called; run_bfloat16 throws
    // std::invalid_argument.
    void run_bfloat16(const BFloat16View& x, const TensorView& out, const TensorView* residual,
                      const ConvGeometry& geometry, Activation activation) const;
    // The same into a bfloat16 out, each value rounded to nearest even as the kernels store it.
    void run_bfloat16(const BFloat16View& x, const BFloat16View& out, const ConvGeometry& geometry,
                      Activation activation) const;
    bool reads_bfloat16() const;
    // Static int8: out = the requantized convolution of x (see QuantizedConvParams).
    void run_quantized(const QuantizedView& x, const QuantizedView& out, const ConvGeometry& geometry) const;
    bool quantized_io() const;  // packed from QuantizedConvParams

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

struct ConvOptions {
    ConvGeometry geometry;
    int64_t groups = 1;
    Activation activation = Activation::none;
    Layout layout = Layout::nhwc;
    Precision precision = Precision::fp32;
};

// One call, packing the weights on the way: weight is K x (C / groups), row-major and contiguous
// (PyTorch's (K, C/groups, 1, 1) memory), bias K values or null, K = out's channel extent.
void conv1x1(const TensorView& x, const float* weight, const float* bias, const TensorView& out,
             const TensorView* residual, const ConvOptions& options);

// Depthwise convolution, NHWC: one kh x kw filter per channel,
//   out[n, oh, ow, c] = act(bias[c] + sum_{i, j} x[n, oh sh - ph + i, ow sw - pw + j, c] w[c, i, j] + residual)
// with zero padding. Weights (and bias) are packed for the kernel of the ISA active at construction.
class DepthwiseWeights {
public:
    // weight: C filters of kh x kw values, contiguous (PyTorch's (C, 1, kh, kw) memory); bias: C
    // values or nullptr.
    DepthwiseWeights(const float* weight, int64_t channels, int64_t kernel_h, int64_t kernel_w, const float* bias);
    ~DepthwiseWeights();
    DepthwiseWeights(const DepthwiseWeights&) = delete;
    DepthwiseWeights& operator=(const DepthwiseWeights&) = delete;

    int64_t channels() const;
    int64_t kernel_h() const;
    int64_t kernel_w() const;
    const char* isa() const;
    const char* kernel_name() const;

    // (N, Ho, Wo, C) for x (N, H, W, C): Ho = (H + 2 pad_h - kh) / stride_h + 1.
    std::array<int64_t, 4> output_shape(const TensorView& x, const ConvGeometry& geometry) const;

    // out = act(depthwise(x) + bias + residual); residual may be null or alias out exactly.
    // Throws std::invalid_argument for mismatched shapes or a non-contiguous channel axis.
    // Thread-safe: concurrent runs are fine.
    void run(const TensorView& x, const TensorView& out, const TensorView* residual,
             const ConvGeometry& geometry, Activation activation) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// Dense convolution, NHWC (a network's stem, ResNet's 3x3 layers):
//   out[n, oh, ow, k] = act(bias[k] + sum_{i, j, c} x[n, oh sh - ph + i, ow sw - pw + j, c] w[k, c, i, j] + residual)
// with zero padding, computed as the GEMM's 1x1 convolution over im2col rows (each output pixel's
// kh x kw x C window in one row), built a band of output rows at a time.
class DenseConvWeights {
public:
    // weight: K x C/groups x kh x kw, contiguous (PyTorch's layout); bias: K values or nullptr.
    // groups divides C and K: output channels [g K/groups, (g+1) K/groups) see input channels
    // [g C/groups, (g+1) C/groups) only (ResNeXt's and RegNet's grouped 3x3 layers).
    DenseConvWeights(const float* weight, int64_t out_channels, int64_t in_channels, int64_t kernel_h, int64_t kernel_w,
                     const float* bias, int64_t groups = 1);
    ~DenseConvWeights();
    DenseConvWeights(const DenseConvWeights&) = delete;
    DenseConvWeights& operator=(const DenseConvWeights&) = delete;

    int64_t out_channels() const;
    int64_t in_channels() const;
    int64_t kernel_h() const;
    int64_t kernel_w() const;
    int64_t groups() const;
    const char* isa() const;
    const char* kernel_name() const;

    // (N, Ho, Wo, K) for x (N, H, W, C): Ho = (H + 2 pad_h - kh) / stride_h + 1.
    std::array<int64_t, 4> output_shape(const TensorView& x, const ConvGeometry& geometry) const;

    // out = act(conv(x) + bias + residual); residual may be null or alias out exactly. Throws
    // std::invalid_argument for mismatched shapes or a non-contiguous channel axis. Thread-safe.
    void run(const TensorView& x, const TensorView& out, const TensorView* residual,
             const ConvGeometry& geometry, Activation activation) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// MobileNetV2's inverted residual block, fused: 1x1 expand (C -> E) + act, depthwise kh x kw + act,
// 1x1 project (E -> K) + act, plus the input when `residual` (stride 1, K == C). Computed in bands
// of output rows, each thread keeping the expanded rows of its band (and the rows the next band
// shares with it) in a buffer sized to stay in L2: the expanded tensor never goes to memory whole.
// Where the 1x1 weights outweigh the activations, the stages run in turn on whole tensors instead.
struct InvertedResidualWeights {
    const float* expand_weight = nullptr;   // E x C, contiguous; null: no expansion (E == C)
    const float* expand_bias = nullptr;     // E values or null
    const float* depthwise_weight = nullptr;  // E x kh x kw, contiguous
    const float* depthwise_bias = nullptr;
    const float* project_weight = nullptr;  // K x E, contiguous
    const float* project_bias = nullptr;
    int64_t in_channels = 0, hidden_channels = 0, out_channels = 0, kernel_h = 3, kernel_w = 3;
    Activation expand_activation = Activation::relu6, depthwise_activation = Activation::relu6,
               project_activation = Activation::none;
    ConvGeometry depthwise_geometry;  // stride and padding of the depthwise convolution
    bool residual = false;
    // Optional squeeze-excitation between the depthwise and project stages (EfficientNet's MBConv,
    // MobileNetV3): each image's channel means of the depthwise output -> 1x1 reduce (E -> S) +
    // se_activation -> 1x1 expand (S -> E) + se_gate give a scale per channel, which multiplies the
    // depthwise output before the projection. The depthwise output is then kept whole (the means
    // need all of it) and scaled band by band just before it is projected.
    const float* se_reduce_weight = nullptr;  // S x E, contiguous; null: no squeeze-excitation
    const float* se_reduce_bias = nullptr;    // S values or null
    const float* se_expand_weight = nullptr;  // E x S, contiguous
    const float* se_expand_bias = nullptr;    // E values or null
    int64_t se_channels = 0;                  // S
    Activation se_activation = Activation::silu, se_gate = Activation::sigmoid;
    // Of the 1x1 stages (expand, squeeze-excitation, project); the depthwise stage computes in float32.
    Precision precision = Precision::fp32;
};

class InvertedResidual {
public:
    explicit InvertedResidual(const InvertedResidualWeights& weights);
    ~InvertedResidual();
    InvertedResidual(const InvertedResidual&) = delete;
    InvertedResidual& operator=(const InvertedResidual&) = delete;

    int64_t in_channels() const;
    int64_t out_channels() const;
    const char* isa() const;
    // (N, Ho, Wo, K) for x (N, H, W, C), Ho as the depthwise convolution's.
    std::array<int64_t, 4> output_shape(const TensorView& x) const;
    // out = the block applied to x. out must not overlap x. Thread-safe.
    void run(const TensorView& x, const TensorView& out) const;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

// Threads used by a call from the calling thread: the override for this thread, else
// set_num_threads, never more than OpenMP's setting for this thread (OMP_NUM_THREADS,
// threadpoolctl, else the number of cores), which is also the default. pwcpu never changes
// OpenMP's setting, so other libraries sharing the OpenMP runtime (PyTorch) keep theirs.
int get_num_threads();
void set_num_threads(int n);  // process-wide, n >= 1
// Overrides the count for calls made from the calling thread only (0 removes the override);
// returns the previous override. Scopes in different threads do not interfere.
int set_num_threads_for_this_thread(int n);
// True in a child forked from a parent that had several threads (an OpenMP pool, whoever started
// it, cannot run in the child under GNU OpenMP): calls there use one thread.
bool single_threaded_after_fork();

// The active ISA's fp32 FMA peak in GFLOP/s, measured over about `seconds` on `threads` threads.
double measure_fma_peak_gflops(int threads, double seconds);

// The longest reduction (channels per group) a 1x1 convolution computes in one pass; longer ones are
// split into blocks, each adding its partial sums to the output. 0 (the default) sizes it from L2,
// which splits only very deep layers; tests set it small so that the split path runs everywhere.
void set_max_reduction_block(int64_t channels);

// Layers whose threads balance their rows while they run (depthwise, the fused block) normally take
// rows from another thread's range only when their own is done. With `first`, each thread starts
// on the others' ranges (from their ends) before its own, so that tests run that path every call.
void set_take_rows_first(bool first);

// Runtime introspection.
struct RuntimeInfo {
    std::string isa;             // ISA whose kernels are used
    std::string isa_reason;      // why it was chosen
    std::vector<std::string> cpu_features;
    std::vector<std::string> supported_isas;  // compiled in and supported by this CPU
    std::string kernel_main;                // the main GEMM kernel (NCHW layers use it)
    std::vector<std::string> gemm_kernels;  // every GEMM kernel; each layer takes the best fit for its width
    std::vector<float> gemm_kernel_speeds;  // their speeds relative to the main kernel, as timed on this CPU
    std::vector<std::string> bf16_gemm_kernels;  // those with bfloat16 weights (precision bf16, NHWC)
    std::vector<std::string> int8_gemm_kernels;  // the int8 family's (precision int8, NHWC)
    std::string bf16_isa, bf16_isa_reason;       // the bf16 family's ISA (PWCPU_BF16_ISA), and why
    std::string int8_isa, int8_isa_reason;       // the ISA of the int8 family's kernels (PWCPU_INT8_ISA), and why
    std::string kernel_depthwise;
    int64_t l1d_bytes = 0, l2_bytes = 0, l3_bytes = 0;
    int64_t stream_store_min_bytes = 0;  // outputs this large bypass the caches (non-temporal stores)
    int64_t streamed_output_calls = 0;   // calls so far that wrote their output that way
    int64_t reused_output_buffers = 0;   // outputs so far given a block freed before (see allocate_buffer)
    int64_t scratch_misses = 0;          // work buffers so far that a thread's scratch arena could not hold
    // Calls so far of layers that time ways of running on their first calls (threads splitting
    // rows or panels; float32 rows that alias split and copied or read by half tiles), by the way
    // each ran (0: the way taken with PWCPU_LAYER_TIMING=0).
    std::array<int64_t, 4> timed_choice_calls{};
};
RuntimeInfo runtime_info();
const char* active_isa();  // cheap: the name of the ISA whose kernels new packings use

// Choose the ISA by name ("scalar", "avx2", "avx512", "avx512vnni", "avx512bf16", or "auto") for
// every kernel family: each takes that ISA's kernels, or where it brings none of the family's (the
// extension levels bring int8 or bf16 kernels only), the next ISA down's. Throws
// std::invalid_argument for an unknown name or one this CPU or build cannot run.
void select_isa(const std::string& name);

}  // namespace pwcpu
