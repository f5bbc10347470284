// Internal types shared by the C++ files behind pmtp.h. Not part of the ABI.
#pragma once

#include "pmtp.h"

#include "llama.h"
#include "llama-ext.h"

#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

// An error with the status the exported function returns.
struct pmtp_error : std::runtime_error {
    int status;
    pmtp_error(int status, const std::string & msg) : std::runtime_error(msg), status(status) {}
};

[[noreturn]] inline void fail(int status, const std::string & msg) { throw pmtp_error(status, msg); }

// While one of these lives on a thread, a GGML_ASSERT reached on that thread throws
// std::runtime_error (with the assert's text) instead of aborting the process: llama.cpp
// checks a malformed model file with asserts in places (a duplicated token, an expert
// count out of range, ...). Used only around calls whose half-built result is thrown away
// on failure and that catch std::exception themselves: loading a model, creating a context.
// Asserts on other threads (compute workers) still abort, as before. See abi.cpp.
struct asserts_throw {
    asserts_throw();
    ~asserts_throw();
    asserts_throw(const asserts_throw &) = delete;
    asserts_throw & operator=(const asserts_throw &) = delete;
};

struct llama_model_deleter   { void operator()(llama_model * m)   const { llama_model_free(m); } };
struct llama_context_deleter { void operator()(llama_context * c) const { llama_free(c); } };
struct llama_sampler_deleter { void operator()(llama_sampler * s) const { llama_sampler_free(s); } };
struct llama_batch_deleter   { void operator()(llama_batch_ext * b) const { llama_batch_ext_free(b); } };

using model_ptr   = std::unique_ptr<llama_model,     llama_model_deleter>;
using context_ptr = std::unique_ptr<llama_context,   llama_context_deleter>;
using sampler_ptr = std::unique_ptr<llama_sampler,   llama_sampler_deleter>;
using batch_ptr   = std::unique_ptr<llama_batch_ext, llama_batch_deleter>;

struct pmtp_model {
    std::string path;
    model_ptr   model;
    std::string arch;
    int32_t     n_layer       = 0;   // trunk layers
    int32_t     n_layer_mtp   = 0;   // MTP layers declared by the metadata
    bool        has_trunk     = true;
    bool        has_mtp       = false; // every declared MTP block has its required tensors
    bool        mtp_loaded    = false; // loaded with load_mtp and has_mtp
    std::string mtp_missing;           // first missing MTP tensor, for error messages

    // RPC: the workers this model is spread over, their failure counts when it loaded
    // (a later increase means a connection was lost), and the devices of its split.
    std::vector<std::string>        rpc_endpoints;
    std::vector<uint64_t>           rpc_failures;
    std::vector<ggml_backend_dev_t> devices;   // NULL-terminated, as llama_model_params wants
    ggml_backend_dev_t              mtp_device = nullptr;
    mutable std::string             rpc_lost;  // set once a worker is lost: the model is unusable

    const llama_vocab * vocab() const { return llama_model_get_vocab(model.get()); }
};

// Reads the GGUF header (no tensor data) and fills what load needs to check first.
struct gguf_summary {
    std::string arch;
    int64_t     n_layer_all  = -1;
    int64_t     n_layer_mtp  = 0;
    std::set<std::string> tensors;
};
gguf_summary read_gguf_summary(const std::string & path);

int32_t n_vocab_of(const pmtp_model * m);

// acceptance.cpp
void sampling_probs(const pmtp_sampling & sp, const float * logits, int32_t n_vocab, float * probs);
llama_token sample_dense(const float * probs, int32_t n_vocab, std::mt19937_64 & rng);
void seed_rng(std::mt19937_64 & rng, uint64_t seed);
// Logprob (and top-k when asked) of out->tokens[i] under the raw logits of its row.
void fill_logprobs(const pmtp_sampling & sp, const float * logits, int32_t n_vocab, int32_t i, pmtp_step_result * out);
// Returns the number of accepted drafts; next is the residual or bonus token.
size_t rejection_verify(const float * p, const float * q, const llama_token * drafts, size_t n, int32_t n_vocab,
                        std::mt19937_64 & rng, llama_token & next);

// ---------------------------------------------------------------- session

struct mtp_heads;  // mtp.cpp
struct mtp_heads_deleter { void operator()(mtp_heads * h) const; };
using heads_ptr = std::unique_ptr<mtp_heads, mtp_heads_deleter>;

// Largest number of rows one target decode may hold and still compute every row exactly
// like a one-token decode on CPU (vendor/patches/0008 keeps batches up to this size on the
// per-row kernels). Batched steps of several sequences are cut into decodes of this size.
constexpr int32_t k_rows_exact = 64;

// One sequence of a session: what it has decoded, its pending token and sampler.
// A session with n_seq_max = N holds N of them (ids 0..N-1); the single-sequence
// verbs of the ABI act on sequence 0.
struct seq_state {
    int32_t             id = 0;          // llama seq id (and KV stream when N > 1)
    std::vector<llama_token> history;    // tokens in the target KV, [n_past]
    llama_token         pending = -1;    // sampled, not yet decoded (-1 = none)
    int32_t             logits_row = -1; // output row of the kept logits in ctx
    uint64_t            logits_decode = 0; // session decode count when logits_row was set
    std::vector<float>  last_h;          // target hidden state at n_past - 1, [n_embd]
    int32_t             n_last_decode = 0;  // tokens in the last target decode (whose snapshots are kept)
    // The last n_deferred tokens of history are not in the target KV: a rollback with MTP
    // heads dropped them to get their hidden states back from a decode, which the next
    // prefill runs with its own rows (session_settle runs it alone for anything else).
    int32_t             n_deferred = 0;
    // last_h is not the hidden state at n_past - 1 and no logits are kept: a rollback while
    // the heads skip old rows decoded nothing again (mtp_rollback_gap); a prefill ends
    // it, and a sample before any decodes the last kept token again for its logits
    bool                h_missing = false;
    sampler_ptr         sampler;
    pmtp_sampling       sampling{};
    std::mt19937_64     rng;             // draws of rejection-sampling steps

    int32_t n_past() const { return (int32_t) history.size(); }
};

struct pmtp_session {
    pmtp_model *        model = nullptr;
    pmtp_session_params params{};
    context_ptr         ctx;
    batch_ptr           batch;
    int32_t             n_vocab = 0;
    int32_t             n_embd  = 0;
    int32_t             n_swa   = 0;
    uint32_t            n_ctx   = 0;     // per sequence
    uint32_t            n_batch = 0;
    uint32_t            n_ubatch = 0;
    uint32_t            n_seq_max = 1;
    bool                recurrent = false;  // recurrent or hybrid model (state rolls back by snapshots)
    uint64_t            n_decodes = 0;   // target decodes so far (a decode overwrites every output row)
    uint64_t            graph_builds = 0; // target decodes that built a compute graph (pmtp_session_graph_builds)

    std::vector<seq_state> seqs;         // [n_seq_max]
    heads_ptr           heads;           // null when MTP is off
    pmtp_stats          stats{};

    pmtp_session();
    ~pmtp_session();

    llama_memory_t mem() const { return llama_get_memory(ctx.get()); }
    seq_state & seq(int32_t id);         // throws PMTP_ERR_INVALID_ARG when out of range
};

// rpc.cpp
// Connects to p.rpc_servers and fills m->devices / m->mtp_device for llama_model_params.
void rpc_prepare(pmtp_model * m, const pmtp_model_params & p);
// Throws PMTP_ERR_RPC when a worker of m failed since it loaded (the model is then unusable).
void rpc_check(const pmtp_model * m);
// After a decode: waits for its results, then rpc_check (no-op without workers).
void rpc_check_decode(const pmtp_model * m, llama_context * ctx);

// session.cpp
void session_create(pmtp_session * s, pmtp_model * model, const pmtp_session_params & p);
void session_set_sampling(pmtp_session * s, seq_state & sq, const pmtp_sampling & sp);
void session_reset(pmtp_session * s, seq_state & sq);
void session_rollback(pmtp_session * s, seq_state & sq, int32_t n_keep);
void session_prefill(pmtp_session * s, seq_state & sq, const llama_token * tokens, size_t n);
// Decode the tokens a rollback deferred (seq_state::n_deferred) on their own, now: before
// anything but a prefill, a reset or a rollback uses the sequence (no-op when none are).
void session_settle(pmtp_session * s, seq_state & sq);
// Sample the pending token into out->tokens[i] (with its logprobs when asked).
llama_token session_sample(pmtp_session * s, seq_state & sq, pmtp_step_result * out, int32_t i);
// One target decode of several sequences' rows: rows of one sequence are contiguous,
// at positions pos0[r] .. pos0[r] + n[r] - 1. all_logits: every row gives logits,
// else each sequence's last row only. Sequences' logits_row point into this decode.
struct target_rows {
    std::vector<seq_state *>  seqs;
    std::vector<llama_token>  tokens;    // [sum n]
    std::vector<int32_t>      n;         // rows per sequence
    std::vector<int32_t>      row0;      // first batch row of each sequence
};
void target_decode_rows(pmtp_session * s, const target_rows & rows, bool all_logits);
void target_decode(pmtp_session * s, seq_state & sq, const llama_token * tokens, size_t n, llama_pos pos0, bool all_logits);
void check_swa_window(pmtp_session * s, const seq_state & sq);
// Re-decode a sequence's whole history after the sliding-window guard found lost cells.
void recover_target(pmtp_session * s, seq_state & sq);
// After a rollback: check the window, re-decode the history if cells were lost.
void guard_window(pmtp_session * s, seq_state & sq);
double now_s();

// step.cpp: one cycle for a set of sequences, drafting and verifying them together.
// drafts[i] = 0: a plain decode of seqs[i]'s pending token.
void session_step(pmtp_session * s, const int32_t * seqs, const int32_t * drafts, size_t n, pmtp_step_result * out);
// Decode [pending, drafts...] of one sequence and accept greedily with its sampler.
void session_verify(pmtp_session * s, seq_state & sq, const llama_token * drafts, size_t n, pmtp_step_result * out);

// mtp.cpp
void mtp_heads_create(pmtp_session * s, const pmtp_model * mtp_model, int32_t draft_max);
void mtp_reset(pmtp_session * s, const seq_state & sq);
// The heads keep rows < n_keep, and the queue rows < first (<= n_keep). redecoded: the
// caller queues rows first .. n_keep - 1 again from a new target decode (chained head j
// then re-runs from row first + j, to give head j + 1 its hidden outputs again; a head
// that would need a row before first starts after a gap); else (a pending token
// forgotten, first = n_keep) the heads keep the hidden outputs the next rows need.
void mtp_rollback(pmtp_session * s, const seq_state & sq, int32_t n_keep, int32_t first, bool redecoded);
// Tokens a rollback decodes again so that the heads get the hidden states they need: 1,
// or one per chained head; none while the sequence decodes plainly (a window set: the heads
// start after a gap, mtp_rollback_gap), but 1 for a recurrent target.
int32_t mtp_rollback_redo(const pmtp_session * s, const seq_state & sq);
// A rollback to n_keep that decodes nothing again (mtp_rollback_redo gave 0): every head
// starts again after row n_keep, which pairs with a hidden state no decode gives back.
void mtp_rollback_gap(pmtp_session * s, const seq_state & sq, int32_t n_keep);
// Queue rows [pos0, pos0 + n) for the heads: tokens[i] pairs with the target's hidden
// state of the row before it (h_prev_first for i = 0, then h_rows[i - 1]).
void mtp_push_rows(pmtp_session * s, seq_state & sq, const llama_token * tokens, const float * h_prev_first,
                   const float * h_rows, size_t n, llama_pos pos0);
// Every head takes the sequence's queued rows now (no-op without heads).
void mtp_catch_up(pmtp_session * s, seq_state & sq);
// Rows of the sequence that some head has not taken yet (what a catch-up would run).
int32_t mtp_queued(const pmtp_session * s, const seq_state & sq);
// The heads may skip rows older than the newest n_rows (0: every row), see pmtp.h.
void mtp_set_window(pmtp_session * s, const seq_state & sq, int32_t n_rows);
// Draft k[i] tokens for each seqs[i] (all heads' decodes shared by the sequences) into
// out[i * PMTP_MAX_DRAFT ..]; with rejection sampling the draft distributions stay in the heads.
void mtp_draft(pmtp_session * s, const std::vector<seq_state *> & seqs, const std::vector<int32_t> & k,
               llama_token * out);
// The draft distributions [k, n_vocab] of a sequence's last mtp_draft (rejection sampling).
const float * mtp_draft_probs(pmtp_session * s, const seq_state & sq);
// A verify of one sequence's [pending, drafts[0..n)] at target batch rows row0 .. row0 + n,
// in the order session_step runs them:
// - mtp_accepted: the acceptance rule. How many drafts the rows accept, and the token after
//   them (`next`). q_probs: the draft distributions when the drafts were sampled from them
//   (rejection sampling); NULL accepts drafts equal to the target's own samples.
size_t mtp_accepted(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                    const float * q_probs, llama_token & next);
// - mtp_result: the step's tokens, draft flags and logprobs into out.
void mtp_result(pmtp_session * s, const seq_state & sq, int32_t row0, const llama_token * drafts, size_t n,
                size_t n_acc, llama_token next, pmtp_step_result * out);
// - mtp_commit: the pending token and the accepted drafts join the history, `next` becomes
//   pending; the KV cache drops the rejected rows; chained heads keep the rows still clean.
void mtp_commit(pmtp_session * s, seq_state & sq, const llama_token * drafts, size_t n_acc, llama_token next);
// - mtp_queue_verified: the heads' rows for the committed tokens (after mtp_commit).
void mtp_queue_verified(pmtp_session * s, seq_state & sq, int32_t row0, const llama_token * drafts, size_t n_acc);
// - mtp_count: the session's acceptance statistics.
void mtp_count(pmtp_session * s, size_t n, size_t n_acc, bool rejection);
bool rejection_mode(const seq_state & sq);
// Logits of the last row head `head` decoded, [n_vocab] (after a draft of one sequence,
// chained head j holds draft j's); throws when the head has produced none.
const float * mtp_head_logits(const pmtp_session * s, int32_t head);
