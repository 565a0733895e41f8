// The C++ face of fastar's Python torch.distributed backend (fastar/backend.py): see backend_shim.cpp.
#pragma once

#include <torch/extension.h>

namespace fastar {

// Registers fastar._C.BackendShim on the module.
void bind_backend_shim(pybind11::module_& m);

}  // namespace fastar
