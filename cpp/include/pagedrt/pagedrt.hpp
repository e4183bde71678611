// pagedrt/pagedrt.hpp — the whole public C++ API.
#pragma once

#include "pagedrt/error.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/llguidance_masks.hpp"
#include "pagedrt/runtime.hpp"
#include "pagedrt/sampling_params.hpp"
#include "pagedrt/stats.hpp"
#include "pagedrt/token_mask.hpp"
