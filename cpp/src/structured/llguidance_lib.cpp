#include "structured/llguidance_lib.hpp"

#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>

#include "pagedrt/error.hpp"

namespace pagedrt::llg {

const Api& load(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<Api>> loaded;  // never closed: matchers may outlive their users
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = loaded.find(path); it != loaded.end()) return *it->second;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* why = dlerror();
    throw Error(ErrorKind::Unsupported, "structured output: cannot load llguidance from '" + path + "' (" +
                                            (why ? why : "?") + ")");
  }
  auto api = std::make_unique<Api>();
  api->path = path;
  auto sym = [&](auto& fn, const char* name) {
    void* p = dlsym(h, name);
    if (p == nullptr)
      throw Error(ErrorKind::Unsupported, "structured output: '" + path + "' has no function " + name +
                                              " (llguidance's C API, 1.7.4 or newer, is needed)");
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  sym(api->get_version, "llg_get_version");
  sym(api->new_tokenizer_v2, "llg_new_tokenizer_v2");
  sym(api->free_tokenizer, "llg_free_tokenizer");
  sym(api->constraint_init_set_defaults, "llg_constraint_init_set_defaults");
  sym(api->validate_grammar, "llg_validate_grammar");
  sym(api->new_matcher, "llg_new_matcher");
  sym(api->clone_matcher, "llg_clone_matcher");
  sym(api->free_matcher, "llg_free_matcher");
  sym(api->matcher_get_error, "llg_matcher_get_error");
  sym(api->matcher_is_error, "llg_matcher_is_error");
  sym(api->matcher_get_mask_byte_size, "llg_matcher_get_mask_byte_size");
  sym(api->matcher_compute_mask_into, "llg_matcher_compute_mask_into");
  sym(api->matcher_consume_tokens, "llg_matcher_consume_tokens");
  sym(api->matcher_validate_tokens, "llg_matcher_validate_tokens");
  sym(api->matcher_rollback, "llg_matcher_rollback");
  return *loaded.emplace(path, std::move(api)).first->second;
}

}  // namespace pagedrt::llg
