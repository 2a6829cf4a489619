// pybind11 module effdecode._C: thin wrappers over the launchers in ops.h.
//
// No torch dependency: tensors arrive as device pointers (tensor.data_ptr()) and element strides, the
// stream as torch.cuda.current_stream().cuda_stream. Shape and dtype checks live in the Python wrappers
// (effdecode/ops/*.py); here only what the launcher itself validates is checked.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void verify_greedy(uintptr_t logits, int64_t logits_stride_b, int64_t logits_stride_t, uintptr_t input_ids,
                   int64_t input_ids_stride_b, int64_t input_ids_stride_t, uintptr_t q_lens, uintptr_t finished,
                   uintptr_t eos_token_ids, int64_t num_eos, uintptr_t num_emitted, uintptr_t emitted,
                   uintptr_t finished_out, int64_t batch, int64_t num_cols, int64_t vocab, int dtype,
                   uintptr_t stream) {
  effdecode::VerifyGreedyArgs args{};
  args.logits = as_pointer<const void>(logits);
  args.logits_stride_b = logits_stride_b;
  args.logits_stride_t = logits_stride_t;
  args.input_ids = as_pointer<const int64_t>(input_ids);
  args.input_ids_stride_b = input_ids_stride_b;
  args.input_ids_stride_t = input_ids_stride_t;
  args.q_lens = as_pointer<const int32_t>(q_lens);
  args.finished = as_pointer<const uint8_t>(finished);
  args.eos_token_ids = as_pointer<const int64_t>(eos_token_ids);
  args.num_emitted = as_pointer<int32_t>(num_emitted);
  args.emitted = as_pointer<int64_t>(emitted);
  args.finished_out = as_pointer<uint8_t>(finished_out);
  args.batch = batch;
  args.num_cols = num_cols;
  args.vocab = vocab;
  args.num_eos = num_eos;
  args.dtype = dtype;
  const std::string error = effdecode::verify_greedy_launch(args, stream);
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "effdecode CUDA kernels (raw device pointers and stream handles; see effdecode/ops).";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(effdecode::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(effdecode::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(effdecode::kBFloat16);

  m.def("verify_greedy", &verify_greedy,
        "Greedy speculative verification (enqueued on `stream`, no host sync). Raises RuntimeError if the "
        "launch fails. Call effdecode.ops.verify.verify_greedy rather than this.",
        py::arg("logits"), py::arg("logits_stride_b"), py::arg("logits_stride_t"), py::arg("input_ids"),
        py::arg("input_ids_stride_b"), py::arg("input_ids_stride_t"), py::arg("q_lens"), py::arg("finished"),
        py::arg("eos_token_ids"), py::arg("num_eos"), py::arg("num_emitted"), py::arg("emitted"),
        py::arg("finished_out"), py::arg("batch"), py::arg("num_cols"), py::arg("vocab"), py::arg("dtype"),
        py::arg("stream"));
  m.def("cuda_device_count", &effdecode::cuda_device_count,
        "Visible CUDA devices as seen by the extension's runtime; 0 without a driver or device.");
  m.def("cuda_runtime_version", &effdecode::cuda_runtime_version,
        "CUDART_VERSION the extension was built with (e.g. 13000).");
}
