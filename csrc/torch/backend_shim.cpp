// BackendShim: the c10d::Backend that torch.distributed holds for a "fastar" process group. It
// forwards every call to fastar's Python backend (fastar.backend.FastarBackend, a Python subclass of
// torch's Backend), and hands the Work objects it returns to torch whole.
//
// Why: torch's trampoline for Python backends (c10d::PyBackend, torch/csrc/distributed/c10d/py/
// PyBackend.hpp in torch 2.14) wraps every Work a Python method returns in a PyWorkHolder that
// forwards only wait() and getFuture(). Through it, Work.is_completed() stays False after wait() and
// _source_rank() of a recv from any source raises, even when the Work is Gloo's own (the suite's
// test_isend, test_irecv, test_send_recv_any_source). Here:
//   - a Work implemented in C++ (what the internal Gloo/NCCL backends return for the calls fastar
//     delegates: send/recv, broadcast, ...) reaches torch as itself;
//   - a Work implemented in Python (fastar.backend.FastarWork) reaches torch in a WorkForwarder that
//     forwards every query (is_completed, is_success, exception, result, source rank, ...) to it.
// Every other virtual (name, timeouts, sequence numbers, monitored_barrier, shutdown, ...) goes to the
// Python backend through torch's own trampoline, unchanged.
#include "torch/backend_shim.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/py/PyProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace fastar {
namespace {

using c10d::Backend;
using c10d::Work;
using WorkPtr = c10::intrusive_ptr<Work>;

// Drops a Python reference from a destructor that may run in any thread (or after finalization).
void release_py(py::object& o) {
  if (!o) return;
  if (!Py_IsInitialized()) {
    o.release();  // the interpreter is gone: nothing to give the reference back to
    return;
  }
  py::gil_scoped_acquire gil;
  o = py::object();
}

// A Work implemented in Python, as torch sees it: every query answered by the Python object.
class WorkForwarder : public Work {
 public:
  WorkForwarder(WorkPtr work, py::object py) : work_(std::move(work)), py_(std::move(py)) {}
  ~WorkForwarder() override { release_py(py_); }

  bool wait(std::chrono::milliseconds timeout) override { return work_->wait(timeout); }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return work_->getFuture(); }

  bool isCompleted() override {
    py::gil_scoped_acquire gil;
    if (auto f = method("is_completed")) return f().cast<bool>();
    return work_->isCompleted();
  }

  bool isSuccess() const override {
    py::gil_scoped_acquire gil;
    if (auto f = method("is_success")) return f().cast<bool>();
    return work_->isSuccess();
  }

  std::exception_ptr exception() const override {
    py::gil_scoped_acquire gil;
    if (auto f = method("exception")) {
      py::object e = f();
      if (e.is_none()) return nullptr;
      return std::make_exception_ptr(std::runtime_error(py::str(e).cast<std::string>()));
    }
    return work_->exception();
  }

  std::vector<at::Tensor> result() override {
    {
      py::gil_scoped_acquire gil;
      if (auto f = method("result")) {
        py::object r = f();
        try {
          return r.cast<std::vector<at::Tensor>>();
        } catch (const py::cast_error&) {  // a list of lists (allgather): flattened, as Gloo's result
          std::vector<at::Tensor> flat;
          for (auto item : r) {
            for (auto t : item) flat.push_back(t.cast<at::Tensor>());
          }
          return flat;
        }
      }
    }
    return work_->result();
  }

  int sourceRank() const override { return work_->sourceRank(); }
  void synchronize() override { work_->synchronize(); }
  void abort() override { work_->abort(); }

 private:
  // The Python object's own method `name`, or None where it has only the C++ one (Work's binding).
  py::object method(const char* name) const {
    py::object cls = py::type::of(py_);
    if (!py::hasattr(cls, name)) return py::none();
    py::object mine = cls.attr(name);
    py::object base = py::type::of<Work>().attr(name);
    if (mine.is(base)) return py::none();
    return py_.attr(name);
  }

  WorkPtr work_;
  py::object py_;
};

// What a Python backend method returned, as torch should see it.
WorkPtr adopt(py::object o) {
  if (o.is_none()) return WorkPtr();
  auto work = o.cast<WorkPtr>();
  if (dynamic_cast<c10d::PyProcessGroup::PyWork*>(work.get()) == nullptr) {
    return work;  // a C++ Work (Gloo's, NCCL's): itself, with its own answers
  }
  return c10::make_intrusive<WorkForwarder>(std::move(work), std::move(o));
}

class BackendShim : public Backend {
 public:
  BackendShim(c10::intrusive_ptr<Backend> inner, py::object impl)
      : Backend(inner->getRank(), inner->getSize()), inner_(std::move(inner)), impl_(std::move(impl)) {}
  ~BackendShim() override { release_py(impl_); }

  py::object impl() const { return impl_; }

// The Python backend's method `pyname` when it defines one (looked up as torch's trampoline does),
// its Work adopted; else the trampoline's answer (Backend's default: "does not support ...").
#define FASTAR_SHIM_WORK(pyname, cppname, ...)                                                     \
  {                                                                                                \
    py::gil_scoped_acquire gil;                                                                    \
    py::function f = py::get_override(static_cast<const Backend*>(inner_.get()), pyname);          \
    if (f) return adopt(f(__VA_ARGS__));                                                           \
  }                                                                                                \
  return inner_->cppname(__VA_ARGS__);

  WorkPtr broadcast(std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& opts) override {
    FASTAR_SHIM_WORK("broadcast", broadcast, tensors, opts)
  }
  WorkPtr allreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts) override {
    FASTAR_SHIM_WORK("allreduce", allreduce, tensors, opts)
  }
  WorkPtr allreduce_sparse(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts) override {
    FASTAR_SHIM_WORK("allreduce_sparse", allreduce_sparse, tensors, opts)
  }
  WorkPtr allreduce_coalesced(std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override {
    FASTAR_SHIM_WORK("allreduce_coalesced", allreduce_coalesced, tensors, opts)
  }
  WorkPtr reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override {
    FASTAR_SHIM_WORK("reduce", reduce, tensors, opts)
  }
  WorkPtr allgather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                    const c10d::AllgatherOptions& opts) override {
    FASTAR_SHIM_WORK("allgather", allgather, outputs, inputs, opts)
  }
  WorkPtr all_gather_single(at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) override {
    FASTAR_SHIM_WORK("all_gather_single", all_gather_single, output, input, opts)
  }
  WorkPtr allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                              const c10d::AllgatherOptions& opts) override {
    FASTAR_SHIM_WORK("allgather_coalesced", allgather_coalesced, outputs, inputs, opts)
  }
  WorkPtr all_gather_single_coalesced(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                      const c10d::AllgatherOptions& opts) override {
    FASTAR_SHIM_WORK("all_gather_single_coalesced", all_gather_single_coalesced, outputs, inputs, opts)
  }
  WorkPtr gather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                 const c10d::GatherOptions& opts) override {
    FASTAR_SHIM_WORK("gather", gather, outputs, inputs, opts)
  }
  WorkPtr scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                  const c10d::ScatterOptions& opts) override {
    FASTAR_SHIM_WORK("scatter", scatter, outputs, inputs, opts)
  }
  WorkPtr reduce_scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                         const c10d::ReduceScatterOptions& opts) override {
    FASTAR_SHIM_WORK("reduce_scatter", reduce_scatter, outputs, inputs, opts)
  }
  WorkPtr reduce_scatter_single(at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override {
    FASTAR_SHIM_WORK("reduce_scatter_single", reduce_scatter_single, output, input, opts)
  }
  WorkPtr reduce_scatter_single_coalesced(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::ReduceScatterOptions& opts) override {
    FASTAR_SHIM_WORK("reduce_scatter_single_coalesced", reduce_scatter_single_coalesced, outputs, inputs, opts)
  }
  WorkPtr all_to_all_single(at::Tensor& output, at::Tensor& input, std::vector<int64_t>& output_splits,
                            std::vector<int64_t>& input_splits, const c10d::AllToAllOptions& opts) override {
    FASTAR_SHIM_WORK("all_to_all_single", all_to_all_single, output, input, output_splits, input_splits, opts)
  }
  WorkPtr alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                   const c10d::AllToAllOptions& opts) override {
    FASTAR_SHIM_WORK("alltoall", alltoall, outputs, inputs, opts)
  }
  WorkPtr send(std::vector<at::Tensor>& tensors, int dst, int tag) override {
    FASTAR_SHIM_WORK("send", send, tensors, dst, tag)
  }
  WorkPtr recv(std::vector<at::Tensor>& tensors, int src, int tag) override {
    FASTAR_SHIM_WORK("recv", recv, tensors, src, tag)
  }
  WorkPtr recvAnysource(std::vector<at::Tensor>& tensors, int tag) override {
    FASTAR_SHIM_WORK("recv_anysource", recvAnysource, tensors, tag)
  }
  WorkPtr barrier(const c10d::BarrierOptions& opts) override { FASTAR_SHIM_WORK("barrier", barrier, opts) }
  WorkPtr endCoalescing() override { FASTAR_SHIM_WORK("end_coalescing", endCoalescing) }
#undef FASTAR_SHIM_WORK

  // Everything else: the Python backend's answer, through torch's trampoline.
  const std::string getBackendName() const override { return inner_->getBackendName(); }
  bool supportsSplitting() const override { return inner_->supportsSplitting(); }
  bool supportsCoalescing() const override { return inner_->supportsCoalescing(); }
  bool supportsTimeEstimation() const override { return inner_->supportsTimeEstimation(); }
  bool supportsShrinking() const override { return inner_->supportsShrinking(); }
  bool supportsReconfigure() const override { return inner_->supportsReconfigure(); }
  bool supportsWindow() const override { return inner_->supportsWindow(); }
  bool supportsTensorAlloc(c10::DeviceIndex device) override { return inner_->supportsTensorAlloc(device); }
  c10::intrusive_ptr<Options> getBackendOptions() override { return inner_->getBackendOptions(); }
  void setTimeout(std::chrono::milliseconds timeout) override { inner_->setTimeout(timeout); }
  void startCoalescing() override { inner_->startCoalescing(); }
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override {
    inner_->monitoredBarrier(opts, wait_all_ranks);
  }
  void setSequenceNumberForGroup() override { inner_->setSequenceNumberForGroup(); }
  uint64_t getSequenceNumberForGroup() override { return inner_->getSequenceNumberForGroup(); }
  void waitForPendingWorks() override { inner_->waitForPendingWorks(); }
  void enableCollectivesTiming() override { inner_->enableCollectivesTiming(); }
  void setGroupUid(const std::string& uid) override {
    Backend::setGroupUid(uid);
    inner_->setGroupUid(uid);
  }
  void setBoundDeviceId(std::optional<at::Device> device) override {
    Backend::setBoundDeviceId(device);
    inner_->setBoundDeviceId(device);
  }
  std::optional<at::Device> getBoundDeviceId() const override { return inner_->getBoundDeviceId(); }
  void eagerConnectSingleDevice(at::Device device) override { inner_->eagerConnectSingleDevice(device); }
  c10d::ErrorType getError() override { return inner_->getError(); }
  void abort() override { inner_->abort(); }
  void shutdown() override { inner_->shutdown(); }

 private:
  c10::intrusive_ptr<Backend> inner_;
  py::object impl_;
};

}  // namespace

void bind_backend_shim(py::module_& m) {
  py::class_<BackendShim, Backend, c10::intrusive_ptr<BackendShim>>(
      m, "BackendShim",
      "The c10d Backend torch.distributed holds for a fastar process group: forwards every call to the "
      "Python backend `impl` and returns its Work objects whole (C++ works as themselves, Python works with "
      "every query forwarded), where torch's own trampoline answers only wait() and get_future().")
      .def(py::init([](py::object impl) {
             auto inner = impl.cast<c10::intrusive_ptr<Backend>>();
             return c10::make_intrusive<BackendShim>(std::move(inner), std::move(impl));
           }),
           py::arg("impl"))
      .def_property_readonly("impl", &BackendShim::impl, "The Python backend (fastar.backend.FastarBackend).");
}

}  // namespace fastar
