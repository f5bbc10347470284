// pmtp_quantize: llama.cpp's quantizer with the MTP blocks pinned to one type.
//
// Why: upstream's mixtures treat MTP blocks like trunk blocks (e.g. Q4_K for
// nextn.shared_head_head), which costs accepted drafts, and its importance matrices
// never see MTP tensors, so very low-bit types refuse the file. A tensor-type override
// matching every MTP tensor keeps them at mtp_type, and those types need no imatrix.
#include "internal.h"

#include "ggml.h"

#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <unistd.h>
#include <vector>

namespace fs = std::filesystem;

int run_guarded(const std::function<void()> & f);   // abi.cpp
void check_file(const std::string & path);          // model.cpp
std::string last_llama_error();                     // abi.cpp

namespace {

// llama.cpp applies per-tensor types only when the file type is a quantized one.
bool ftype_is_unquantized(int32_t ftype) {
    return ftype == LLAMA_FTYPE_ALL_F32 || ftype == LLAMA_FTYPE_MOSTLY_F16 || ftype == LLAMA_FTYPE_MOSTLY_BF16;
}

ggml_type unquantized_type_of(int32_t ftype) {
    switch (ftype) {
        case LLAMA_FTYPE_ALL_F32:     return GGML_TYPE_F32;
        case LLAMA_FTYPE_MOSTLY_F16:  return GGML_TYPE_F16;
        default:                      return GGML_TYPE_BF16;
    }
}

void check_params(const pmtp_quantize_params & p) {
    if (p.ftype < 0 || p.ftype >= LLAMA_FTYPE_GUESSED) {
        fail(PMTP_ERR_INVALID_ARG, "file type " + std::to_string(p.ftype) + " is not a llama_ftype");
    }
    const int32_t t = p.mtp_type;
    if (t != -1 && t != GGML_TYPE_F32 && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16 && t != GGML_TYPE_Q8_0) {
        fail(PMTP_ERR_INVALID_ARG, "mtp_type " + std::to_string(t) + " must be F32, F16, BF16, Q8_0 or -1 (same as the trunk)");
    }
    if (t != -1 && ftype_is_unquantized(p.ftype) && t != unquantized_type_of(p.ftype)) {
        fail(PMTP_ERR_INVALID_ARG, std::string("an unquantized file type keeps every tensor at its own type, so the MTP "
             "blocks cannot be ") + ggml_type_name((ggml_type) t) + "; pass mtp_type -1 (same) or a quantized file type");
    }
    if (p.n_imatrix > 0 && (!p.imatrix_names || !p.imatrix_values || !p.imatrix_sizes)) {
        fail(PMTP_ERR_INVALID_ARG, "n_imatrix > 0 but an imatrix array is NULL");
    }
}

void check_paths(const std::string & in, const std::string & out, bool overwrite) {
    check_file(in);
    std::error_code ec;
    const fs::path out_path(out);
    const fs::path dir = out_path.has_parent_path() ? out_path.parent_path() : fs::path(".");
    if (!fs::is_directory(dir, ec)) {
        fail(PMTP_ERR_INVALID_ARG, dir.string() + ": no such directory; create it or choose another output path");
    }
    if (fs::is_directory(out_path, ec)) {
        fail(PMTP_ERR_INVALID_ARG, out + ": is a directory; pass a file name for the quantized model");
    }
    if (fs::exists(out_path, ec)) {
        if (fs::equivalent(in, out_path, ec)) {
            fail(PMTP_ERR_INVALID_ARG, out + ": is the input file; choose another output path");
        }
        if (!overwrite) {
            fail(PMTP_ERR_INVALID_ARG, out + ": already exists; pass overwrite (--force) to replace it");
        }
    }
}

// "^(blk\.(45|46|47)\.|nextn\.)": every tensor of the MTP blocks, nextn.* included
// (llama.cpp matches overrides with std::regex_search). Empty when there are none.
std::string mtp_pattern(const gguf_summary & g, const std::string & path) {
    if (g.n_layer_all < 0) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": no " + g.arch + ".block_count: not a text model; only text models can be quantized here");
    }
    if (g.n_layer_mtp <= 0) {
        return "";
    }
    if (g.n_layer_mtp > g.n_layer_all) {
        fail(PMTP_ERR_MODEL_LOAD, path + ": " + g.arch + ".nextn_predict_layers exceeds " + g.arch +
             ".block_count; re-convert the model");
    }
    std::string blocks;
    for (int64_t il = g.n_layer_all - g.n_layer_mtp; il < g.n_layer_all; ++il) {
        blocks += (blocks.empty() ? "" : "|") + std::to_string(il);
    }
    return "^(blk\\.(" + blocks + ")\\.|nextn\\.)";
}

// llama.cpp reports every failure as one status; sort the ones the caller can fix.
[[noreturn]] void fail_quantize(const std::string & in) {
    const std::string why = last_llama_error();
    if (why.find("imatrix size") != std::string::npos || why.find("non-finite") != std::string::npos) {
        fail(PMTP_ERR_INVALID_ARG, in + ": " + why + "; the importance matrix was not computed for this model");
    }
    if (why.find("imatrix") != std::string::npos || why.find("importance matrix") != std::string::npos) {
        fail(PMTP_ERR_INVALID_ARG, in + ": " + why + "; this file type needs an importance matrix for the trunk "
             "tensors (pass one with --imatrix; the MTP blocks never need one)");
    }
    if (why.find("requantizing") != std::string::npos) {
        fail(PMTP_ERR_INVALID_ARG, in + ": " + why + "; quantize from the F32/F16/BF16 file, or allow requantizing");
    }
    fail(PMTP_ERR_MODEL_LOAD, in + ": llama.cpp could not quantize this model" + (why.empty() ? "" : ": " + why));
}

void quantize(const std::string & in, const std::string & out, const pmtp_quantize_params & p) {
    check_params(p);
    check_paths(in, out, p.overwrite);
    const gguf_summary g = read_gguf_summary(in);
    const std::string pattern = mtp_pattern(g, in);

    llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.nthread          = p.n_threads;
    qp.ftype            = (llama_ftype) p.ftype;
    qp.allow_requantize = p.allow_requantize;
    std::vector<llama_model_tensor_override> overrides;
    if (p.mtp_type >= 0 && !pattern.empty() && !ftype_is_unquantized(p.ftype)) {
        overrides.push_back({pattern.c_str(), (ggml_type) p.mtp_type});
    }
    overrides.push_back({nullptr, GGML_TYPE_COUNT});
    qp.tt_overrides = overrides.data();
    std::vector<llama_model_imatrix_data> imatrix;
    for (size_t i = 0; i < p.n_imatrix; ++i) {
        if (!p.imatrix_names[i] || !p.imatrix_values[i]) {
            fail(PMTP_ERR_INVALID_ARG, "imatrix entry " + std::to_string(i) + " has a NULL name or values");
        }
        imatrix.push_back({p.imatrix_names[i], p.imatrix_values[i], p.imatrix_sizes[i]});
    }
    if (!imatrix.empty()) {
        imatrix.push_back({nullptr, nullptr, 0});
        qp.imatrix = imatrix.data();
    }

    // a hidden name in the output's directory: rename is atomic there, and a crash
    // leaves no file that looks like a model
    const fs::path out_path(out);
    const fs::path partial = out_path.parent_path() /
        ("." + out_path.filename().string() + "." + std::to_string(getpid()) + ".partial");
    std::error_code ec;
    if (llama_model_quantize(in.c_str(), partial.string().c_str(), &qp) != 0) {
        fs::remove(partial, ec);
        fail_quantize(in);
    }
    fs::rename(partial, out_path, ec);
    if (ec) {
        const std::string why = ec.message();
        fs::remove(partial, ec);
        fail(PMTP_ERR_MODEL_LOAD, out + ": cannot move the quantized file into place: " + why);
    }
}

}  // namespace

extern "C" {

pmtp_quantize_params pmtp_quantize_default_params(void) {
    pmtp_quantize_params p{};
    p.ftype     = LLAMA_FTYPE_MOSTLY_Q8_0;
    p.mtp_type  = GGML_TYPE_Q8_0;
    p.n_threads = 0;
    return p;
}

int pmtp_quantize(const char * in_path, const char * out_path, const pmtp_quantize_params * params) {
    return run_guarded([&] {
        if (!in_path || !*in_path || !out_path || !*out_path || !params) {
            fail(PMTP_ERR_INVALID_ARG, "pmtp_quantize: in_path, out_path and params must be given");
        }
        quantize(in_path, out_path, *params);
    });
}

}  // extern "C"
