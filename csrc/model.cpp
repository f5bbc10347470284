// Model loading with every check done before llama.cpp sees the file, model
// metadata, and the tokenizer.
#include "internal.h"

#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;

namespace {

struct gguf_ctx_deleter { void operator()(gguf_context * g) const { gguf_free(g); } };
struct ggml_ctx_deleter { void operator()(ggml_context * c) const { ggml_free(c); } };

constexpr int64_t LLAMA_MAX_LAYERS_CHECK = 512;   // LLAMA_MAX_LAYERS in llama-hparams.h

int64_t gguf_int(const gguf_context * g, const std::string & key, int64_t fallback) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        return fallback;
    }
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  return gguf_get_val_u8(g, id);
        case GGUF_TYPE_INT8:   return gguf_get_val_i8(g, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(g, id);
        case GGUF_TYPE_INT16:  return gguf_get_val_i16(g, id);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(g, id);
        case GGUF_TYPE_UINT64: return (int64_t) gguf_get_val_u64(g, id);
        case GGUF_TYPE_INT64:  return gguf_get_val_i64(g, id);
        default:               return fallback;
    }
}

[[noreturn]] void refuse(const std::string & path, const std::string & why) {
    fail(PMTP_ERR_MODEL_LOAD, path + ": " + why + "; the file is damaged or was written wrongly: re-download or "
                              "re-convert the model");
}

// Values llama.cpp accepts when it loads a model but that abort the process later, inside
// a kernel on a compute thread (found by scripts/fuzz_gguf.py): refused here, before
// llama.cpp sees the file.
void check_values(const std::string & path, const gguf_context * g, const ggml_context * meta_c,
                  const std::string & arch, int64_t n_layer_all, int64_t n_layer_mtp) {
    if (n_layer_all == -1) {
        return;   // no block_count: not a text model; llama.cpp says so better
    }
    if (n_layer_all < 1 || n_layer_all > LLAMA_MAX_LAYERS_CHECK) {
        refuse(path, arch + ".block_count is " + std::to_string(n_layer_all) + " (must be 1.." +
                     std::to_string(LLAMA_MAX_LAYERS_CHECK) + ")");
    }
    if (n_layer_mtp < 0 || n_layer_mtp >= n_layer_all) {
        refuse(path, arch + ".nextn_predict_layers is " + std::to_string(n_layer_mtp) + " with " +
                     std::to_string(n_layer_all) + " blocks");
    }
    for (int64_t i = 0; i < gguf_get_n_kv(g); ++i) {
        const std::string key = gguf_get_key(g, i);
        const bool eps = key.size() >= 7 && key.compare(key.size() - 7, 7, "epsilon") == 0;
        if (eps && gguf_get_kv_type(g, i) == GGUF_TYPE_FLOAT32) {
            const float v = gguf_get_val_f32(g, i);
            if (!std::isfinite(v) || v < 0.0f) {   // rms_norm asserts eps >= 0 on a compute thread
                refuse(path, key + " is " + std::to_string(v) + " (must be a finite number >= 0)");
            }
        }
    }
    // some tokenizers build tables quadratic in a token's length at load or first use; no
    // real vocabulary has a token anywhere near this long
    const int64_t tokens_id = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens_id >= 0 && gguf_get_kv_type(g, tokens_id) == GGUF_TYPE_ARRAY &&
        gguf_get_arr_type(g, tokens_id) == GGUF_TYPE_STRING) {
        constexpr size_t max_token_bytes = 4096;
        for (size_t i = 0; i < gguf_get_arr_n(g, tokens_id); ++i) {
            const size_t n = std::strlen(gguf_get_arr_str(g, tokens_id, i));
            if (n > max_token_bytes) {
                refuse(path, "token " + std::to_string(i) + " is " + std::to_string(n) + " bytes long (at most " +
                             std::to_string(max_token_bytes) + ")");
            }
        }
    }
    // rope rotates pairs of a head's dimensions: at most the head size, and an even count
    const int64_t n_embd   = gguf_int(g, arch + ".embedding_length", -1);
    const int64_t n_head   = gguf_int(g, arch + ".attention.head_count", -1);
    const int64_t head_dim = gguf_int(g, arch + ".attention.key_length",
                                      n_embd > 0 && n_head > 0 ? n_embd / n_head : n_embd);
    for (const char * suffix : {".rope.dimension_count", ".rope.dimension_count_swa"}) {
        const int64_t n_rot = gguf_int(g, arch + suffix, -1);
        if (n_rot == -1 && gguf_find_key(g, (arch + suffix).c_str()) < 0) {
            continue;
        }
        if (n_rot <= 0 || n_rot % 2 != 0 || (head_dim > 0 && n_rot > head_dim)) {   // 0: decode never ends
            refuse(path, arch + suffix + " is " + std::to_string(n_rot) + " (must be even, > 0 and at most the head "
                         "size " + std::to_string(head_dim) + ")");
        }
    }
    // converters and llama-quantize keep 1-D tensors (norms, biases) in F32, and the CPU's
    // element-wise kernels take nothing else there
    ggml_context * meta = const_cast<ggml_context *>(meta_c);   // ggml's iteration API is not const
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        if (ggml_n_dims(t) == 1 && t->type != GGML_TYPE_F32) {
            refuse(path, std::string("1-D tensor '") + t->name + "' is " + ggml_type_name(t->type) + " (must be F32)");
        }
    }
}

}  // namespace

// Also used by quantize.cpp: the same messages for the same bad inputs.
void check_file(const std::string & path) {
    std::error_code ec;
    const auto st = fs::status(path, ec);
    if (ec || !fs::exists(st)) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": no such file; check the path");
    }
    if (fs::is_directory(st)) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": is a directory; pass the path of a .gguf file inside it");
    }
    const auto size = fs::file_size(path, ec);
    if (ec) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": cannot read the file size: " + ec.message());
    }
    if (size == 0) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": file is empty; re-download or re-convert the model");
    }
    std::ifstream f(path, std::ios::binary);
    char magic[4] = {0, 0, 0, 0};
    if (!f || !f.read(magic, 4) || std::memcmp(magic, "GGUF", 4) != 0) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": not a GGUF file (bad magic); convert the model to GGUF first");
    }
}

namespace {

// The MTP blocks need these tensors; upstream treats a file without the first
// eh_proj as trunk-only and asserts later if the others are missing.
const char * const MTP_REQUIRED[] = {"nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight"};

void classify_mtp(pmtp_model * m, const gguf_summary & g) {
    m->has_trunk = g.tensors.count("blk.0.attn_norm.weight") > 0 || g.n_layer_all - g.n_layer_mtp <= 0;
    if (m->n_layer_mtp <= 0) {
        return;
    }
    int n_present = 0;
    for (int32_t i = 0; i < m->n_layer_mtp; ++i) {
        for (const char * suffix : MTP_REQUIRED) {
            const std::string name = "blk." + std::to_string(m->n_layer + i) + "." + suffix;
            if (g.tensors.count(name)) {
                n_present++;
            } else if (m->mtp_missing.empty()) {
                m->mtp_missing = name;
            }
        }
    }
    m->has_mtp = m->mtp_missing.empty();
    if (n_present == 0) {
        m->mtp_missing = "all of them (trunk-only file)";
    }
}

}  // namespace

gguf_summary read_gguf_summary(const std::string & path) {
    ggml_context * meta_raw = nullptr;     // tensor shapes, no data
    gguf_init_params gp = {/*no_alloc =*/ true, /*ctx =*/ &meta_raw};
    std::unique_ptr<gguf_context, gguf_ctx_deleter> g(gguf_init_from_file(path.c_str(), gp));
    std::unique_ptr<ggml_context, ggml_ctx_deleter> meta(meta_raw);
    if (!g) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": corrupted or truncated GGUF header; re-download or re-convert the model");
    }
    gguf_summary s;
    const int64_t arch_id = gguf_find_key(g.get(), "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(g.get(), arch_id) != GGUF_TYPE_STRING) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": GGUF has no general.architecture; it is not a llama.cpp model file");
    }
    s.arch        = gguf_get_val_str(g.get(), arch_id);
    s.n_layer_all = gguf_int(g.get(), s.arch + ".block_count", -1);
    s.n_layer_mtp = gguf_int(g.get(), s.arch + ".nextn_predict_layers", 0);
    check_values(path, g.get(), meta.get(), s.arch, s.n_layer_all, s.n_layer_mtp);

    std::error_code ec;
    const uint64_t file_size = fs::file_size(path, ec);
    const size_t   data_off  = gguf_get_data_offset(g.get());
    for (int64_t i = 0; i < gguf_get_n_tensors(g.get()); ++i) {
        const char * name = gguf_get_tensor_name(g.get(), i);
        s.tensors.insert(name);
        const uint64_t end = data_off + gguf_get_tensor_offset(g.get(), i) + gguf_get_tensor_size(g.get(), i);
        if (end > file_size) {
            fail(PMTP_ERR_MODEL_LOAD, path + ": truncated: tensor '" + name + "' ends at byte " +
                 std::to_string(end) + " but the file has " + std::to_string(file_size) +
                 " bytes; the download or conversion did not finish");
        }
    }
    return s;
}

std::string last_llama_error();  // abi.cpp

namespace {

// What the tokenizer asserts on its first call, checked once the vocabulary is loaded.
void check_vocab(const std::string & path, const llama_vocab * v) {
    const enum llama_vocab_type type = llama_vocab_type(v);
    if (type == LLAMA_VOCAB_TYPE_NONE) {
        refuse(path, "the model has no tokenizer (tokenizer.ggml.model is missing or 'none')");
    }
    if ((llama_vocab_get_add_bos(v) || type == LLAMA_VOCAB_TYPE_WPM) && llama_vocab_bos(v) == LLAMA_TOKEN_NULL) {
        refuse(path, "the tokenizer adds a BOS token but the model defines none (tokenizer.ggml.bos_token_id)");
    }
    if (llama_vocab_get_add_eos(v) && llama_vocab_eos(v) == LLAMA_TOKEN_NULL) {
        refuse(path, "the tokenizer adds an EOS token but the model defines none (tokenizer.ggml.eos_token_id)");
    }
    if (type == LLAMA_VOCAB_TYPE_WPM && llama_vocab_sep(v) == LLAMA_TOKEN_NULL) {
        refuse(path, "the WPM tokenizer needs a SEP token but the model defines none");
    }
}

}  // namespace

pmtp_model * model_load(const char * path_c, const pmtp_model_params & p) {
    if (!path_c || !*path_c) {
        fail(PMTP_ERR_INVALID_ARG, "model path is empty");
    }
    const std::string path = path_c;
    check_file(path);
    const gguf_summary g = read_gguf_summary(path);

    auto m = std::make_unique<pmtp_model>();
    m->path        = path;
    m->arch        = g.arch;
    m->n_layer_mtp = (int32_t) std::max<int64_t>(0, g.n_layer_mtp);
    m->n_layer     = (int32_t) std::max<int64_t>(0, g.n_layer_all - g.n_layer_mtp);
    classify_mtp(m.get(), g);

    if (p.load_mtp) {
        if (m->n_layer_mtp == 0) {
            fail(PMTP_ERR_MTP, path + ": " + g.arch + " model has no MTP layers (" + g.arch +
                 ".nextn_predict_layers is 0 or absent); use mtp=False or a model converted with its MTP layers");
        }
        if (!m->has_mtp && m->has_trunk) {
            fail(PMTP_ERR_MTP, path + " declares " + std::to_string(m->n_layer_mtp) +
                 " MTP layers but lacks their tensors (missing: " + m->mtp_missing +
                 "); convert with the MTP tensors, or pass mtp='mtp-only.gguf' with a matching MTP file");
        }
        if (!m->has_mtp) {
            fail(PMTP_ERR_MTP, path + ": MTP-only file is missing " + m->mtp_missing);
        }
    }
    if (p.n_tensor_split > 0 && !p.tensor_split) {
        fail(PMTP_ERR_INVALID_ARG, "tensor_split is NULL but n_tensor_split > 0");
    }
    if (p.n_tensor_split > llama_max_devices()) {
        fail(PMTP_ERR_INVALID_ARG, "tensor_split has " + std::to_string(p.n_tensor_split) +
             " entries but this build supports at most " + std::to_string(llama_max_devices()) + " devices");
    }
    if (p.split_mode < 0 || p.split_mode > 2) {
        fail(PMTP_ERR_INVALID_ARG, "split_mode must be 0 (none), 1 (layer) or 2 (row)");
    }

    std::vector<float> split(llama_max_devices(), 0.0f);
    for (size_t i = 0; i < p.n_tensor_split; ++i) {
        split[i] = p.tensor_split[i];
    }
    rpc_prepare(m.get(), p);

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = p.n_gpu_layers;
    mp.split_mode   = (llama_split_mode) p.split_mode;
    mp.main_gpu     = p.main_gpu;
    mp.tensor_split = p.n_tensor_split ? split.data() : nullptr;
    mp.load_mtp     = p.load_mtp;
    mp.vocab_only   = p.vocab_only;
    mp.progress_callback           = p.progress;
    mp.progress_callback_user_data = p.progress_user;
    mp.load_mode    = p.use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    mp.devices      = m->devices.empty() ? nullptr : m->devices.data();
    mp.mtp_device   = m->mtp_device;

    {
        asserts_throw checked;   // a malformed file fails the load instead of aborting
        m->model.reset(llama_model_load_from_file(path.c_str(), mp));
    }
    rpc_check(m.get());  // a worker lost while loading explains a failed load best
    if (!m->model) {
        const std::string why = last_llama_error();
        if (!m->rpc_endpoints.empty() && why.find("RPC") != std::string::npos) {
            fail(PMTP_ERR_RPC, path + ": an RPC worker could not take its share of the model (" + why +
                 "); free memory on that worker, or give it fewer layers with n_gpu_layers / tensor_split");
        }
        fail(PMTP_ERR_MODEL_LOAD, path + ": llama.cpp could not load this " + g.arch + " model" +
             (why.empty() ? std::string() : ": " + why));
    }
    check_vocab(path, m->vocab());
    m->mtp_loaded = p.load_mtp && m->has_mtp;
    return m.release();
}

int32_t n_vocab_of(const pmtp_model * m) { return llama_vocab_n_tokens(m->vocab()); }

void model_info(const pmtp_model * m, pmtp_model_info * out) {
    std::memset(out, 0, sizeof(*out));
    const llama_model * lm = m->model.get();
    const llama_vocab * v  = m->vocab();
    std::snprintf(out->arch, sizeof(out->arch), "%s", m->arch.c_str());
    llama_model_desc(lm, out->desc, sizeof(out->desc));
    out->n_vocab      = llama_vocab_n_tokens(v);
    out->n_ctx_train  = llama_model_n_ctx_train(lm);
    out->n_embd       = llama_model_n_embd(lm);
    out->n_layer      = m->n_layer;
    out->n_layer_mtp  = m->n_layer_mtp;
    out->n_swa        = llama_model_n_swa(lm);
    out->size_bytes   = llama_model_size(lm);
    out->n_params     = llama_model_n_params(lm);
    out->token_bos    = llama_vocab_bos(v);
    out->token_eos    = llama_vocab_eos(v);
    out->token_eot    = llama_vocab_eot(v);
    out->add_bos      = llama_vocab_get_add_bos(v);
    out->add_eos      = llama_vocab_get_add_eos(v);
    out->has_mtp_tensors   = m->has_mtp;
    out->has_trunk_tensors = m->has_trunk;
    out->mtp_loaded   = m->mtp_loaded;
    out->is_recurrent = llama_model_is_recurrent(lm) || llama_model_is_hybrid(lm);
}

std::string model_meta(const pmtp_model * m, const char * key) {
    if (!key) {
        fail(PMTP_ERR_INVALID_ARG, "metadata key is NULL");
    }
    const int32_t n = llama_model_meta_val_str(m->model.get(), key, nullptr, 0);
    if (n < 0) {
        fail(PMTP_ERR_INVALID_ARG, std::string("model has no metadata key '") + key + "'");
    }
    std::string s((size_t) n + 1, '\0');
    llama_model_meta_val_str(m->model.get(), key, s.data(), s.size());
    s.resize((size_t) n);
    return s;
}

std::vector<llama_token> tokenize(const pmtp_model * m, const char * text, size_t len, bool add_special, bool parse_special) {
    if (len > (size_t) INT32_MAX / 2) {
        fail(PMTP_ERR_INVALID_ARG, "text is too long to tokenize in one call");
    }
    std::vector<llama_token> out(len + 8);
    int32_t n = 0;
    try {
        n = llama_tokenize(m->vocab(), text, (int32_t) len, out.data(), (int32_t) out.size(), add_special, parse_special);
        if (n < 0) {
            out.resize((size_t) -n);
            n = llama_tokenize(m->vocab(), text, (int32_t) len, out.data(), (int32_t) out.size(), add_special,
                               parse_special);
        }
    } catch (const std::out_of_range &) {
        // the tokenizer looked up a piece the vocabulary lacks (e.g. a byte-fallback token)
        fail(PMTP_ERR_INVALID_ARG, "this model's vocabulary cannot encode the text: a token the tokenizer needs "
                                   "(such as a byte-fallback token <0xXX>) is missing from the model file");
    }
    if (n < 0) {
        fail(PMTP_ERR_INTERNAL, "tokenization failed");
    }
    out.resize((size_t) n);
    return out;
}

std::string token_piece(const pmtp_model * m, llama_token t, bool special) {
    char buf[256];
    int32_t n = llama_token_to_piece(m->vocab(), t, buf, sizeof(buf), 0, special);
    if (n >= 0) {
        return std::string(buf, (size_t) n);
    }
    std::string s((size_t) -n, '\0');
    n = llama_token_to_piece(m->vocab(), t, s.data(), (int32_t) s.size(), 0, special);
    s.resize((size_t) std::max(n, 0));
    return s;
}

std::string detokenize(const pmtp_model * m, const llama_token * toks, size_t n, bool remove_special, bool unparse_special) {
    const int32_t n_vocab = n_vocab_of(m);
    for (size_t i = 0; i < n; ++i) {
        if (toks[i] < 0 || toks[i] >= n_vocab) {
            fail(PMTP_ERR_INVALID_ARG, "token id " + std::to_string(toks[i]) + " at index " + std::to_string(i) +
                 " is out of range [0, " + std::to_string(n_vocab) + ")");
        }
    }
    std::string s(n * 8 + 16, '\0');
    int32_t r = llama_detokenize(m->vocab(), toks, (int32_t) n, s.data(), (int32_t) s.size(), remove_special, unparse_special);
    if (r < 0) {
        s.resize((size_t) -r);
        r = llama_detokenize(m->vocab(), toks, (int32_t) n, s.data(), (int32_t) s.size(), remove_special, unparse_special);
    }
    s.resize((size_t) std::max(r, 0));
    return s;
}
