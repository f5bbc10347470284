/*
 * pmtp.h: the whole C ABI of pyllama-mtp.
 *
 * Opaque handles, POD parameter structs and int status codes. Every function
 * returns PMTP_OK (0) or an error status; the message of the last error on the
 * calling thread is available from pmtp_last_error(). Nothing here prints,
 * exits or aborts on bad input.
 *
 * The region between the cdef markers is read verbatim by cffi
 * (pyllama_mtp/_native.py), so it must stay plain C without preprocessor lines.
 */
#ifndef PMTP_H
#define PMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  define PMTP_API __declspec(dllexport)
#else
#  define PMTP_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* --- cffi cdef begin --- */

/* Limits of the engine, read by cffi and by pyllama_mtp.config (one definition each). */
#define PMTP_MAX_DRAFT 8          /* drafts per step (MTP heads kept ready)              */
#define PMTP_MAX_SEQUENCES 64     /* sequences decoded together (n_seq_max)              */
#define PMTP_MAX_TOP_LOGPROBS 20  /* alternatives per token with n_logprobs              */

enum pmtp_status {
    PMTP_OK                = 0,
    PMTP_ERR_INVALID_ARG   = 1,  /* a parameter is out of range or inconsistent        */
    PMTP_ERR_MODEL_LOAD    = 2,  /* file missing, unreadable, not a GGUF, unsupported   */
    PMTP_ERR_CONTEXT_FULL  = 3,  /* the tokens do not fit in the context window         */
    PMTP_ERR_DECODE        = 4,  /* llama_decode failed                                 */
    PMTP_ERR_MTP           = 5,  /* model/file cannot do MTP as asked                   */
    PMTP_ERR_SWA_GUARD     = 6,  /* sliding-window cache lost cells it still needs      */
    PMTP_ERR_OUT_OF_MEMORY = 7,
    PMTP_ERR_ABORTED       = 8,  /* cancelled by a callback                             */
    PMTP_ERR_BUFFER        = 9,  /* output buffer too small; *n_out says how much       */
    PMTP_ERR_INTERNAL      = 10,
    PMTP_ERR_RPC           = 11  /* an RPC worker is unreachable or lost its connection */
};

typedef struct pmtp_model   pmtp_model;
typedef struct pmtp_session pmtp_session;

/* Message of the last error on this thread ("" if none). */
PMTP_API const char * pmtp_last_error(void);

/* llama.cpp / ggml log lines go to this callback (level: ggml_log_level). NULL = drop. */
typedef void (*pmtp_log_fn)(int level, const char * text, void * user);
PMTP_API void pmtp_set_log_callback(pmtp_log_fn fn, void * user);

/* JSON object describing the build (version, backends, devices, system info). */
PMTP_API int pmtp_build_info(char * buf, size_t cap, size_t * n_out);

/* ---------------------------------------------------------------- models */

/* Return false to cancel loading. */
typedef bool (*pmtp_progress_fn)(float progress, void * user);

typedef struct pmtp_model_params {
    int32_t          n_gpu_layers;    /* -1 = all                                     */
    int32_t          split_mode;      /* llama_split_mode: 0 none, 1 layer, 2 row      */
    int32_t          main_gpu;
    const float *    tensor_split;    /* [n_tensor_split] proportions or NULL          */
    size_t           n_tensor_split;
    bool             use_mmap;
    bool             load_mtp;        /* load the MTP (NextN) blocks too               */
    bool             vocab_only;
    pmtp_progress_fn progress;
    void *           progress_user;
    const char * const * rpc_servers; /* [n_rpc_servers] "host:port" RPC workers whose  */
    size_t           n_rpc_servers;   /* devices join the layer split (before local GPUs)*/
    int32_t          mtp_placement;   /* 0: MTP layers + output layer on the local device */
                                      /* when rpc_servers are given (the output layer    */
                                      /* also without load_mtp, for a model with MTP     */
                                      /* layers); 1: by the layer split                  */
} pmtp_model_params;

PMTP_API pmtp_model_params pmtp_model_default_params(void);
PMTP_API int  pmtp_model_load(const char * path, const pmtp_model_params * params, pmtp_model ** out);
PMTP_API void pmtp_model_free(pmtp_model * model);

typedef struct pmtp_model_info {
    char     arch[64];
    char     desc[128];
    int32_t  n_vocab;
    int32_t  n_ctx_train;
    int32_t  n_embd;
    int32_t  n_layer;            /* trunk layers                                        */
    int32_t  n_layer_mtp;        /* MTP layers the file declares                        */
    int32_t  n_swa;              /* sliding window (0 = none)                           */
    uint64_t size_bytes;
    uint64_t n_params;
    int32_t  token_bos;          /* -1 when absent                                      */
    int32_t  token_eos;
    int32_t  token_eot;
    bool     add_bos;
    bool     add_eos;
    bool     has_mtp_tensors;    /* the MTP blocks' tensors are in this file            */
    bool     has_trunk_tensors;  /* false for an MTP-only file                          */
    bool     mtp_loaded;         /* loaded with load_mtp and the tensors present        */
    bool     is_recurrent;       /* has recurrent state (needs snapshots to roll back)  */
} pmtp_model_info;

PMTP_API int pmtp_model_get_info(const pmtp_model * model, pmtp_model_info * out);
/* Metadata string value for key (e.g. "tokenizer.chat_template"); PMTP_ERR_INVALID_ARG if absent. */
PMTP_API int pmtp_model_meta(const pmtp_model * model, const char * key, char * buf, size_t cap, size_t * n_out);
PMTP_API bool pmtp_token_is_eog(const pmtp_model * model, int32_t token);
PMTP_API bool pmtp_token_is_control(const pmtp_model * model, int32_t token);

/* -------------------------------------------------------------- tokens */

PMTP_API int pmtp_tokenize(const pmtp_model * model, const char * text, size_t len,
                           bool add_special, bool parse_special,
                           int32_t * out, size_t cap, size_t * n_out);
/* Bytes of every token's piece, concatenated: piece i is buf[offsets[i] .. offsets[i+1]).
 * offsets has n_vocab + 1 entries. Call with buf = NULL to learn the size in *n_out. */
PMTP_API int pmtp_vocab_pieces(const pmtp_model * model, bool special, char * buf, size_t cap,
                               uint32_t * offsets, size_t * n_out);
PMTP_API int pmtp_detokenize(const pmtp_model * model, const int32_t * tokens, size_t n,
                             bool remove_special, bool unparse_special,
                             char * buf, size_t cap, size_t * n_out);

/* ------------------------------------------------------------ sessions */

typedef struct pmtp_session_params {
    uint32_t n_ctx;              /* 0 = n_ctx_train                                     */
    uint32_t n_batch;            /* max tokens per prefill call into llama_decode       */
    uint32_t n_ubatch;           /* physical batch; raised to draft + 1 when MTP is on  */
    int32_t  n_threads;
    int32_t  n_threads_batch;
    int32_t  type_k;             /* ggml_type of the KV cache, -1 = default (f16)       */
    int32_t  type_v;
    int32_t  flash_attn;         /* -1 auto, 0 off, 1 on                                */
    int32_t  draft_max;          /* MTP heads kept ready; 0 = no MTP                    */
    const pmtp_model * mtp_model;/* MTP-only model for a trunk-only one; NULL = same    */
    bool     swa_guard;          /* check the sliding window after every rollback       */
    bool     unsafe_split_verify;/* testing: allow n_ubatch < draft + 1                 */
    uint32_t n_seq_max;          /* sequences decoded together (ids 0..n_seq_max-1);    */
                                 /* n_ctx is per sequence; > 1 needs flash attention    */
                                 /* and a model without recurrent state                 */
} pmtp_session_params;

typedef struct pmtp_sampling {
    float    temperature;        /* <= 0: greedy                                        */
    int32_t  top_k;              /* <= 0: off                                           */
    float    top_p;              /* 1: off                                              */
    float    min_p;              /* 0: off                                              */
    float    repeat_penalty;     /* 1: off                                              */
    float    presence_penalty;   /* 0: off                                              */
    float    frequency_penalty;  /* 0: off                                              */
    int32_t  penalty_last_n;     /* tokens the penalties look back over                 */
    uint32_t seed;
    int32_t  n_logprobs;         /* -1: none; 0: each token's logprob; k <= 20: and the */
                                 /* k most likely tokens (the target's raw distribution)*/
    int32_t  accept;             /* draft acceptance at temperature > 0:                */
                                 /* 0 match (draft == target's sample), 1 rejection     */
                                 /* sampling (drafts drawn from the heads' q, accepted  */
                                 /* with min(1, p/q), residual max(0, p - q) on reject) */
} pmtp_sampling;

/* Counters since the session was created (or pmtp_stats_reset). */
typedef struct pmtp_stats {
    uint64_t n_steps;            /* draft/verify cycles                                 */
    uint64_t n_drafted;
    uint64_t n_accepted;
    uint64_t n_emitted;          /* tokens produced by steps (accepted + sampled)      */
    uint64_t accepted_at[PMTP_MAX_DRAFT];  /* drafts accepted at position i             */
    uint64_t drafted_at[PMTP_MAX_DRAFT];   /* drafts proposed at position i             */
    uint64_t accepted_at_rejection[PMTP_MAX_DRAFT]; /* the same two, for steps that */
    uint64_t drafted_at_rejection[PMTP_MAX_DRAFT];  /* used rejection sampling      */
    uint64_t swa_recoveries;     /* guard violations repaired by re-prefill             */
    uint64_t n_target_decodes;   /* target decode calls (prefill chunks, steps, redos)  */
    uint64_t n_rows_skipped;     /* rows the first MTP head skipped (mtp_window)        */
    double   t_draft_s;
    double   t_verify_s;
    double   t_catchup_s;
    double   t_sample_s;
    double   t_prefill_s;
    double   t_decode_s;         /* plain one-token decodes                             */
} pmtp_stats;

/* What one pmtp_step produced: tokens in order; from_draft[i] says whether token i was
 * a draft the target accepted (the last token of a step never is). With n_logprobs >= 0
 * each token also carries log p under the target's own logits (log-softmax), accepted
 * drafts included, and with n_logprobs = k the k most likely tokens. */
typedef struct pmtp_step_result {
    int32_t tokens[PMTP_MAX_DRAFT + 1];
    bool    from_draft[PMTP_MAX_DRAFT + 1];
    int32_t n_tokens;
    int32_t n_drafted;
    int32_t n_accepted;
    float   logprob[PMTP_MAX_DRAFT + 1];
    int32_t top_tokens[PMTP_MAX_DRAFT + 1][PMTP_MAX_TOP_LOGPROBS];
    float   top_logprobs[PMTP_MAX_DRAFT + 1][PMTP_MAX_TOP_LOGPROBS];
    int32_t n_top;
} pmtp_step_result;

PMTP_API pmtp_session_params pmtp_session_default_params(void);
PMTP_API pmtp_sampling       pmtp_sampling_default(void);
PMTP_API int  pmtp_session_new(pmtp_model * model, const pmtp_session_params * params, pmtp_session ** out);
PMTP_API void pmtp_session_free(pmtp_session * session);
PMTP_API int  pmtp_session_set_sampling(pmtp_session * session, const pmtp_sampling * sampling);

PMTP_API uint32_t pmtp_session_n_ctx(const pmtp_session * session);
PMTP_API uint32_t pmtp_session_n_ubatch(const pmtp_session * session);
PMTP_API int32_t  pmtp_session_n_past(const pmtp_session * session);
/* Target decodes so far that built a compute graph rather than reusing the previous
 * decode's: after a change of rows (another draft length, another batch) or when the KV
 * cache's attended span grew past a multiple of 256 cells. Such a step runs slow (on a
 * small model several times a steady one), so draft="auto" does not take its time as a
 * steady sample. */
PMTP_API uint64_t pmtp_session_graph_builds(const pmtp_session * session);
PMTP_API int32_t  pmtp_session_draft_max(const pmtp_session * session);
PMTP_API int  pmtp_session_stats(const pmtp_session * session, pmtp_stats * out);
PMTP_API void pmtp_session_stats_reset(pmtp_session * session);

/* Forget everything: empty KV (target and MTP heads), n_past = 0. */
PMTP_API int pmtp_reset(pmtp_session * session);
/* Keep the first n_keep tokens, drop the rest (target, heads, recurrent state).
 * With MTP heads the last kept tokens (1, or one per chained head) are decoded again for
 * their hidden states: with the next prefill's rows, or alone before a sample, logits or
 * catch-up that comes first (n_target_decodes counts either).
 * PMTP_ERR_SWA_GUARD if the sliding window no longer holds what n_keep needs. */
PMTP_API int pmtp_rollback(pmtp_session * session, int32_t n_keep);
/* Decode tokens at n_past (chunks of n_batch); logits of the last one are kept. */
PMTP_API int pmtp_prefill(pmtp_session * session, const int32_t * tokens, size_t n);
/* Copy the kept logits of the last decoded token: [n_vocab]. */
PMTP_API int pmtp_logits(pmtp_session * session, float * out, size_t cap);
/* Sample from the kept logits with the session's sampler chain and remember the
 * token as pending (the next pmtp_step decodes it); out gets that one token. */
PMTP_API int pmtp_sample(pmtp_session * session, pmtp_step_result * out);
/* One cycle from the pending token. draft = 0: decode it, sample the next (1 token).
 * draft = k > 0: MTP heads draft k tokens, one target decode verifies them,
 * accepted drafts and one sampled token come back (1 .. k+1 tokens). */
PMTP_API int pmtp_step(pmtp_session * session, int32_t draft, pmtp_step_result * out);

/* Granular MTP verbs (tests, policies). pmtp_draft proposes up to k tokens from the
 * pending one without changing anything a later pmtp_step relies on; pmtp_verify
 * decodes [pending, drafts...], accepts greedily with the sampler and rolls back. */
PMTP_API int pmtp_draft(pmtp_session * session, int32_t k, int32_t * out, size_t cap, size_t * n_out);
PMTP_API int pmtp_verify(pmtp_session * session, const int32_t * drafts, size_t n, pmtp_step_result * out);

/* Several sequences in one session (n_seq_max > 1). The verbs above act on sequence 0;
 * these take a sequence id. A prefill decodes one sequence alone; sample right after
 * it (a later decode of any sequence overwrites the logits it keeps). */
PMTP_API uint32_t pmtp_session_n_seq_max(const pmtp_session * session);
PMTP_API int32_t  pmtp_seq_n_past(const pmtp_session * session, int32_t seq);
/* Forget the sequence (its KV, heads' rows, pending token); its sampler stays. */
PMTP_API int pmtp_seq_reset(pmtp_session * session, int32_t seq);
/* Keep the sequence's first n_keep tokens, as pmtp_rollback does for sequence 0 (a new
 * prompt that shares a prefix with what the sequence holds prefills only the rest). */
PMTP_API int pmtp_seq_rollback(pmtp_session * session, int32_t seq, int32_t n_keep);
/* Let the MTP heads take every row the sequence decoded since they last ran (plain
 * decodes and prefills queue rows for them; a draft takes them itself). A draft-length
 * policy calls it before the first drafting step after plain decoding, so that the
 * step it times costs what a step among drafting steps costs. No-op without heads. */
PMTP_API int pmtp_seq_mtp_catch_up(pmtp_session * session, int32_t seq);
/* How many rows pmtp_seq_mtp_catch_up would give the heads now (the most any one head
 * lacks); 0 without heads or for an unknown sequence. A policy weighs what switching
 * from plain decoding to drafting costs by it. */
PMTP_API int32_t pmtp_seq_mtp_queued(const pmtp_session * session, int32_t seq);
/* While a sequence decodes plainly for long, feeding the MTP heads every row costs a
 * batched decode of the heads per n_batch rows (on a small trunk with three chained heads
 * about a tenth of plain decoding) for drafts nobody asks for. With n_rows > 0 the heads
 * may skip rows older than the newest n_rows (at least the heads' count + 1) that they
 * have not taken: the queue is cut back to n_rows whenever it holds a quarter more (at
 * least 2 rows more), and the heads' KV keeps a gap there. Only drafts can change (their
 * attention misses the skipped positions); the output never does. n_rows = 0 (the default, and again after
 * a reset) feeds every row. It holds across prefills: the library's driver sets it for
 * each prompt and each step (on while the sequence decodes plainly). No-op without heads. */
PMTP_API int pmtp_seq_mtp_window(pmtp_session * session, int32_t seq, int32_t n_rows);
PMTP_API int pmtp_seq_set_sampling(pmtp_session * session, int32_t seq, const pmtp_sampling * sampling);
PMTP_API int pmtp_seq_prefill(pmtp_session * session, int32_t seq, const int32_t * tokens, size_t n);
PMTP_API int pmtp_seq_sample(pmtp_session * session, int32_t seq, pmtp_step_result * out);
/* One cycle for n sequences together: seqs[i] drafts drafts[i] tokens (0 = plain
 * decode; capped by draft_max and the context) and out[i] gets its tokens as pmtp_step
 * would. The heads draft for all sequences in one decode per head; the target decodes
 * sequences with equal draft lengths and consecutive ids in one batch. Each sequence's
 * tokens equal what pmtp_step gives it alone (greedy: bit for bit). */
PMTP_API int pmtp_step_batch(pmtp_session * session, const int32_t * seqs, const int32_t * drafts, size_t n,
                             pmtp_step_result * out);

/* Rejection-sampling verifier, pure over dense distributions (exposed for tests):
 * p: [n + 1, n_vocab] target probabilities, q: [n, n_vocab] draft probabilities,
 * drafts: [n] tokens drawn from q. Writes the accepted drafts and one more token
 * (residual or bonus) to out_tokens [n + 1]; *n_accepted = accepted drafts. */
PMTP_API int pmtp_rejection_verify(const float * p, const float * q, const int32_t * drafts, size_t n,
                                   int32_t n_vocab, uint64_t seed, int32_t * out_tokens, int32_t * n_accepted);
/* The distribution the session's sampler draws from for these logits (temperature,
 * top_k, top_p, min_p as llama.cpp's chain applies them): probs [n_vocab]. */
PMTP_API int pmtp_sampling_probs(const pmtp_sampling * sampling, const float * logits, int32_t n_vocab, float * probs);

/* ---- RPC: a model spread over hosts, and serving this host's devices ---- */

typedef struct pmtp_device_info {
    char     name[64];
    char     description[128];
    char     endpoint[128];      /* "host:port" of an RPC worker; "" for local devices  */
    int32_t  type;               /* ggml_backend_dev_type: 0 CPU, 1 GPU, 2 IGPU, 3 ACCEL*/
    uint64_t memory_free;
    uint64_t memory_total;
} pmtp_device_info;

/* RPC protocol version of this build; false when the build has no RPC backend. */
PMTP_API bool pmtp_rpc_version(int32_t * major, int32_t * minor, int32_t * patch);
/* Connect/send/receive timeout of RPC connections opened from now on (0 = none). */
PMTP_API int pmtp_rpc_set_timeout(double seconds);
/* This host's devices (what a worker can serve). */
PMTP_API int pmtp_local_devices(pmtp_device_info * out, size_t cap, size_t * n_out);
/* Devices a model uses: the local CPU first, then the devices of its split. */
PMTP_API int pmtp_model_devices(const pmtp_model * model, pmtp_device_info * out, size_t cap, size_t * n_out);
/* Serve devices (by name; none = every GPU, else the CPU) over RPC at endpoint. Blocks
 * while serving; returns only when the server cannot start or stops (an error). */
PMTP_API int pmtp_rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads,
                            const char * const * device_names, size_t n_devices);

/* ---- quantize ---- */

/* Per-tensor importance data (what llama-imatrix measures): for the tensor named
 * names[i], values[i] holds sizes[i] floats (row length x number of experts). */
typedef struct pmtp_quantize_params {
    int32_t              ftype;            /* llama_ftype of the output (e.g. 2 = Q4_0, 15 = Q4_K_M) */
    int32_t              mtp_type;         /* ggml_type of every tensor of the MTP blocks that    */
                                           /* llama.cpp quantizes (F32, F16, BF16 or Q8_0);       */
                                           /* -1: llama.cpp's own choice for the file type        */
    int32_t              n_threads;        /* <= 0: all cores                                     */
    bool                 allow_requantize; /* accept already quantized input tensors              */
    bool                 overwrite;        /* replace out_path if it exists                       */
    const char * const * imatrix_names;    /* [n_imatrix]                                         */
    const float * const * imatrix_values;  /* [n_imatrix]                                         */
    const size_t *       imatrix_sizes;    /* [n_imatrix]                                         */
    size_t               n_imatrix;        /* 0: no importance matrix                             */
} pmtp_quantize_params;

PMTP_API pmtp_quantize_params pmtp_quantize_default_params(void);
/* Quantize the GGUF at in_path into out_path, keeping the MTP blocks at mtp_type. The
 * output is written under a temporary name next to out_path and renamed on success, so a
 * failure leaves nothing behind. MTP tensors never need importance data. */
PMTP_API int pmtp_quantize(const char * in_path, const char * out_path, const pmtp_quantize_params * params);

/* ---- MTP head logits (parity tests) ---- */

/* Logits of the last row MTP head `head` decoded, [n_vocab]: after pmtp_draft(k) on a
 * model with chained heads (step35), head j < k holds the distribution draft j came from. */
PMTP_API int pmtp_head_logits(const pmtp_session * session, int32_t head, float * out, size_t cap);

/* ---- kernel probes (batch-invariance tests) ---- */

/* The probes run on the CPU backend when `device` is NULL or "", else on the device of that
 * name (e.g. "CUDA0"; an unknown name, or an op the device does not run, is
 * PMTP_ERR_INVALID_ARG). */

/* One matrix product, computed as a model's decode computes it: the weight w [m, k] (f32,
 * converted to ggml type `type`; on the CPU, placed in the repacking buffer when `repack`
 * is set and the CPU has a repacked layout for that type) times x [n, k] gives out [n, m];
 * *repacked says whether the repacked layout was used. Tests compare an n-row product with
 * n one-row products. */
PMTP_API int pmtp_probe_mul_mat(int32_t type, int64_t k, int64_t m, int64_t n, const float * w,
                                const float * x, bool repack, int32_t n_threads, float * out,
                                bool * repacked, const char * device);

/* Flash attention as the models run it (ggml_flash_attn_ext, F32
 * precision): q [n_q, n_head, d_k] f32; k [n_kv, n_head_kv, d_k] and v [n_kv, n_head_kv,
 * d_v] given as f32 and stored as ggml type kv_type (F16 or F32); mask [n_q, n_kv] f32 (0
 * or -INFINITY) or NULL; out [n_q, n_head, d_v]. */
PMTP_API int pmtp_probe_flash_attn(int32_t kv_type, int64_t d_k, int64_t d_v, int64_t n_head,
                                   int64_t n_head_kv, int64_t n_kv, int64_t n_q, const float * q,
                                   const float * k, const float * v, const float * mask,
                                   float scale, int32_t n_threads, float * out, const char * device);

/* A per-token op of a model's graph other than the matrix products and attention, on
 * x [n, ne0] f32, n rows at once: out [n, out_ne0]. Ops (enum pmtp_row_op): rms_norm (eps
 * 1e-6), norm (1e-5), l2_norm (1e-6), soft_max (scale 0.125, `mask` [n, ne0] f32 stored as
 * F16 as a model's, or NULL), sum_rows (out_ne0 1), top_k (the MoE router's
 * argsort_top_k, k = `param`; out holds the int32 indices' bits), swiglu (x's halves are
 * gate and value: out_ne0 ne0 / 2), rope_neox (head size `param`, row i at position
 * pos[i]). Tests compare an n-row call with n one-row calls. */
enum pmtp_row_op {
    PMTP_ROW_RMS_NORM = 0,
    PMTP_ROW_NORM = 1,
    PMTP_ROW_L2_NORM = 2,
    PMTP_ROW_SOFT_MAX = 3,
    PMTP_ROW_SUM_ROWS = 4,
    PMTP_ROW_TOP_K = 5,
    PMTP_ROW_SWIGLU = 6,
    PMTP_ROW_ROPE_NEOX = 7
};
PMTP_API int pmtp_probe_row_op(int32_t op, int64_t ne0, int64_t n, const float * x, const float * mask,
                               const int32_t * pos, int32_t param, int32_t n_threads, float * out);

/* --- cffi cdef end --- */

#ifdef __cplusplus
}
#endif

#endif /* PMTP_H */
