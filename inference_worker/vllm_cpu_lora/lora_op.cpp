// trainq_rows::lora_linear, the compiled vLLM-CPU graph's LoRA op without Python on the common path.
//
// Built and loaded by rows_op.py in this folder for --compile-lora. The compiled
// graph calls one LoRA op per layer, 120 a decode step of SmolLM2-135M; through trainq::lora_linear
// (Python, compilation.py) each call cost ~10 us of Python and ctypes around a 2-12 us kernel.
// This op does what that one does, `output` plus the layer's update for `x`, and calls lora_rows.c
// itself, when two things the Python op published are still true:
//
//   the step:  the punica wrapper's index buffer has not been written since (its version counter), and
//              x has as many rows as the step;
//   the layer: none of its LoRA weight tensors has been written since (their version counters), it
//              was published with this step's wrapper, and lora_rows.c holds each slot the step uses;
//
// and x and the output are what the kernel reads (bfloat16 rows, the layer's widths, fewer rows than
// the Python side shares out between threads). Otherwise it calls trainq::lora_linear, which does the
// update and publishes the step and the layer again. The first call of a step, or after vLLM writes an
// adapter, takes that way; the others stay in C++. The published state is process-wide and unguarded:
// one thread runs the model in each vLLM-CPU worker process, and publishes and reads it.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

// lora_rows.c's entry point (its address set by set_kernel: one build of the kernel serves both ops).
using RowsFn = int (*)(const void *layer, const void *x, int64_t x_stride, int64_t rows, void *y,
                       int64_t y_stride, const int64_t *slots, float scale);

struct Layer {
    int64_t kernel_layer = 0;  // address of lora_rows.c's trainq_lora_layer; 0: not published
    int64_t in_features = 0;
    int64_t width = 0;
    std::vector<at::Tensor> weights;  // held: the version counters are read from them
    std::vector<int64_t> versions;
    std::vector<bool> slots;  // slots lora_rows.c holds
    const void *indices = nullptr;  // the index buffer of the wrapper it was published with
};

struct Step {
    at::Tensor indices;  // the wrapper's index buffer; its first `rows` entries are the step's slots
    int64_t version = -1;
    int64_t rows = -1;
    std::vector<int64_t> slots;  // the distinct slots >= 0 among them
};

RowsFn kernel = nullptr;
int64_t max_rows = 0;
std::vector<Layer> layers;
Step step;

void set_kernel(int64_t address, int64_t rows_limit) {
    kernel = reinterpret_cast<RowsFn>(address);
    max_rows = rows_limit;
}

void set_step(const at::Tensor &indices, int64_t version, int64_t rows, std::vector<int64_t> slots) {
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.numel() >= rows,
                "trainq_rows: the step's indices must be a contiguous int64 buffer of at least ", rows, " entries");
    step = Step{indices, version, rows, std::move(slots)};
}

void set_layer(int64_t number, int64_t kernel_layer, int64_t in_features, int64_t width,
               std::vector<at::Tensor> weights, std::vector<int64_t> versions, std::vector<int64_t> slots) {
    TORCH_CHECK(number >= 0 && weights.size() == versions.size(), "trainq_rows: a layer's number and versions");
    if (static_cast<size_t>(number) >= layers.size()) layers.resize(number + 1);
    // Published right after its step (compilation.py): the layer belongs to that step's wrapper.
    Layer layer{kernel_layer, in_features, width, std::move(weights), std::move(versions), {},
                step.rows >= 0 ? step.indices.data_ptr() : nullptr};
    for (int64_t slot : slots) {
        if (slot >= static_cast<int64_t>(layer.slots.size())) layer.slots.resize(slot + 1);
        layer.slots[slot] = true;
    }
    layers[number] = std::move(layer);
}

bool layer_current(const Layer &layer) {
    if (layer.kernel_layer == 0 || layer.indices != step.indices.data_ptr()) return false;
    for (size_t i = 0; i < layer.weights.size(); i++)
        if (layer.weights[i]._version() != static_cast<uint32_t>(layer.versions[i])) return false;
    for (int64_t slot : step.slots)
        if (slot >= static_cast<int64_t>(layer.slots.size()) || !layer.slots[slot]) return false;
    return true;
}

bool step_current(const at::Tensor &x) {
    return step.rows >= 0 && step.indices._version() == static_cast<uint32_t>(step.version) &&
           x.size(0) == step.rows;
}

bool kernel_reads(const at::Tensor &t, int64_t columns, bool at_least) {
    return t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.stride(1) == 1 &&
           (at_least ? t.size(1) >= columns : t.size(1) == columns);
}

at::Tensor python_op(const at::Tensor &output, const at::Tensor &x, int64_t number) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("trainq::lora_linear", "")
                         .typed<at::Tensor(const at::Tensor &, const at::Tensor &, int64_t)>();
    return op.call(output, x, number);
}

at::Tensor lora_linear(const at::Tensor &output, const at::Tensor &x, int64_t number) {
    if (kernel == nullptr || number < 0 || number >= static_cast<int64_t>(layers.size()))
        return python_op(output, x, number);
    const Layer &layer = layers[number];
    // The shapes first: C reads and writes where the addresses say.
    if (!kernel_reads(x, layer.in_features, false) || !kernel_reads(output, layer.width, true) ||
        output.size(0) != x.size(0) || x.size(0) >= max_rows || !step_current(x) || !layer_current(layer))
        return python_op(output, x, number);
    at::Tensor result = output.clone();
    if (result.stride(1) != 1) return python_op(output, x, number);  // a clone of a strided output
    int status = kernel(reinterpret_cast<const void *>(layer.kernel_layer), x.data_ptr(), x.stride(0), x.size(0),
                        result.data_ptr(), result.stride(0), step.indices.data_ptr<int64_t>(), 1.0f);
    TORCH_CHECK(status == 0, "trainq_rows: lora_rows.c could not allocate its scratch memory");
    return result;
}

}  // namespace

TORCH_LIBRARY(trainq_rows, m) {
    m.def("lora_linear(Tensor output, Tensor x, int layer) -> Tensor");
    m.def("set_kernel(int address, int max_rows) -> ()", set_kernel);
    m.def("set_step(Tensor indices, int version, int rows, int[] slots) -> ()", set_step);
    m.def("set_layer(int layer, int kernel_layer, int in_features, int width, Tensor[] weights, int[] versions, "
          "int[] slots) -> ()",
          set_layer);
}

TORCH_LIBRARY_IMPL(trainq_rows, CPU, m) { m.impl("lora_linear", lora_linear); }
