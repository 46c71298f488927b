/* mdopt: the Magnitude-Direction optimizer (arXiv 2606.25971) behind a C ABI.
 *
 * Life cycle: mdopt_create -> mdopt_add_group* -> mdopt_add_param* -> mdopt_finalize
 *             -> (mdopt_step | mdopt_save | mdopt_load | mdopt_set_pointers
 *                 | mdopt_set_group_lr | mdopt_set_group_hparam)* -> mdopt_destroy
 * Every call returns an mdopt_status; on failure mdopt_last_error() names what is wrong
 * and the optimizer is left exactly as it was before the call. */
#ifndef MDOPT_OPTIMIZER_H_
#define MDOPT_OPTIMIZER_H_

#include <stddef.h>
#include <stdint.h>

#include "mdopt/comm.h"
#include "mdopt/export.h"
#include "mdopt/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mdopt_optimizer mdopt_optimizer;

/* Element types of parameters and gradients. bf16 is stored as uint16_t (the top half of
 * an IEEE float32); mdopt rounds to it with round-to-nearest-even. */
typedef enum { MDOPT_DTYPE_F32 = 0, MDOPT_DTYPE_BF16 = 1 } mdopt_dtype;

/* One tensor of the model. W is row-major; a 2-D tensor is d_out x d_in (shape[0] rows),
 * a 3-D tensor is a stack of shape[0] independent shape[1] x shape[2] matrices (MoE
 * experts), a 1-D tensor is a vector (no sphere, no gains). Unused shape entries are
 * ignored. Pointers are host memory for device=cpu, device memory on device K for
 * device=cuda:K.
 *
 * Versioned by struct_size (docs/ABI.md, "Versioning"): fields are only ever appended, the
 * library reads only the fields that lie within struct_size, and accepts any struct_size
 * from MDOPT_PARAM_DESC_SIZE_V1 up. Start from MDOPT_PARAM_DESC_INIT (or
 * mdopt_param_desc_init()), which sets struct_size = sizeof(mdopt_param_desc) and zeroes
 * the rest. The dtype fields hold mdopt_dtype values in a fixed-width integer, so that any
 * value a caller passes is well defined (and refused when it is not a dtype). */
typedef struct {
  size_t struct_size;
  const char* name;  /* unique within the optimizer; copied */
  const char* group; /* a group added with mdopt_add_group; copied */
  int ndim;          /* 1, 2 or 3 */
  int64_t shape[3];
  int32_t param_dtype; /* an mdopt_dtype */
  void* param;         /* the model's tensor; mdopt writes the updated weights here */
  int32_t grad_dtype;  /* an mdopt_dtype */
  const void* grad;    /* the data-parallel mean gradient, same shape; NULL: none (skipped,
                        * see mdopt_step) */
  /* Since ABI 1 (minor 4): */
  double radius_scale; /* multiplies this parameter's sphere radius (radius=auto, fan_in or a
                        * number; radius=init ignores it), e.g. 1/sqrt(2 layers) for output
                        * projections; 0 (the initializer's value) means 1 */
  /* New fields go here, at the end, and nowhere else. */
} mdopt_param_desc;

/* The size of the first version of mdopt_param_desc (through `grad`): the smallest
 * struct_size mdopt_add_param accepts. Stays the same when fields are appended. */
#define MDOPT_PARAM_DESC_SIZE_V1 \
  ((size_t)(offsetof(mdopt_param_desc, grad) + sizeof(((mdopt_param_desc*)0)->grad)))

/* What a step did. Versioned like mdopt_param_desc: the library writes only the fields that
 * lie within struct_size (never past it) and accepts any struct_size from
 * MDOPT_STEP_INFO_SIZE_V1 up. Start from MDOPT_STEP_INFO_INIT or mdopt_step_info_init(). */
typedef struct {
  size_t struct_size;
  int64_t step;                /* steps taken so far, skipped steps excluded (the t of a
                                  parameter's bias corrections is its own count, which
                                  lags where it lacked a gradient: mdopt_get_state "step") */
  int skipped;                 /* 1 when non-finite gradients made this call skip */
  double grad_norm;            /* global L2 norm of all gradients (NaN/Inf when skipped) */
  double seconds;              /* wall time of the call */
  double exposed_comm_seconds; /* time the call waited on communication (0 on one rank) */
  /* Since ABI 1 (minor 1): */
  double comm_seconds; /* time with this rank's communication in flight during the call */
  int64_t bytes_sent;  /* bytes this rank sent during the call (docs/ABI.md: how counted) */
  /* New fields go here, at the end, and nowhere else. */
} mdopt_step_info;

/* The size of the first version of mdopt_step_info (through `exposed_comm_seconds`). */
#define MDOPT_STEP_INFO_SIZE_V1                              \
  ((size_t)(offsetof(mdopt_step_info, exposed_comm_seconds) + \
            sizeof(((mdopt_step_info*)0)->exposed_comm_seconds)))

/* The largest struct_size accepted: anything bigger is a garbage size, not a newer struct. */
#define MDOPT_STRUCT_SIZE_MAX ((size_t)65536)

/* Initializers: struct_size = sizeof, every other field zero. Every field is spelled out, so
 * they compile without warnings as C and as C++ (also under -Wmissing-field-initializers):
 *   mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;   mdopt_step_info i = MDOPT_STEP_INFO_INIT;
 * A field appended to a struct is appended to its initializer too. */
#define MDOPT_PARAM_DESC_INIT \
  { sizeof(mdopt_param_desc), NULL, NULL, 0, {0, 0, 0}, 0, NULL, 0, NULL, 0.0 }
#define MDOPT_STEP_INFO_INIT { sizeof(mdopt_step_info), 0, 0, 0.0, 0.0, 0.0, 0.0, 0 }

/* The same as functions, for expressions (d = mdopt_param_desc_init();) and bindings. */
static inline mdopt_param_desc mdopt_param_desc_init(void) {
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  return d;
}
static inline mdopt_step_info mdopt_step_info_init(void) {
  mdopt_step_info i = MDOPT_STEP_INFO_INIT;
  return i;
}

/* options: space-separated key=value, each at most once, all optional:
 *   device=cpu (default) | cuda:K      threads=N (OpenMP threads; default: the OpenMP default)
 *   kernels=fast (default) | reference (the float64 unfused oracle, for tests and benchmarks)
 *   ns_dtype=f32 | bf16                (Newton-Schulz products in bf16; default f32 on the CPU,
 *                                        where bf16 needs oneDNN, bf16 on a GPU) */
MDOPT_API mdopt_status mdopt_create(mdopt_comm* comm, const char* options, mdopt_optimizer** out);

/* A named parameter group; spec = "preset=<name> key=value ...", see docs/ABI.md.
 * Since ABI 1 (minor 7) the key blocks= also takes groups:G:h0,h1,... (a fused weight of G
 * groups of pieces, block j piece j of every group: a GQA linear_qkv); an older library
 * refuses it. */
MDOPT_API mdopt_status mdopt_add_group(mdopt_optimizer* opt, const char* name, const char* spec);

/* Since ABI 1 (minor 2); an older libmdopt.so.1 lacks the symbol.
 * Sets the learning rate of one group, e.g. from a torch LR scheduler that drives each
 * group's lr. The group's gain_lr follows by the same factor: gain_lr = (the spec's gain_lr)
 * * lr / (the spec's lr), so a schedule decays the gains with their matrices (a spec with
 * lr=0 keeps its gain_lr). mdopt_step's lr_scale still multiplies both. Any time after
 * mdopt_add_group of that group, before or after finalize; lr must be finite and >= 0. */
MDOPT_API mdopt_status mdopt_set_group_lr(mdopt_optimizer* opt, const char* group, double lr);

/* Since ABI 1 (minor 2). The group's current lr and gain_lr (what mdopt_step multiplies by
 * lr_scale); either pointer may be NULL. */
MDOPT_API mdopt_status mdopt_get_group_lr(const mdopt_optimizer* opt, const char* group,
                                          double* lr, double* gain_lr);

/* Since ABI 1 (minor 4); an older libmdopt.so.1 lacks the symbols.
 * Sets one hyperparameter of a group that may change between steps, e.g. from a torch
 * scheduler that cycles momentum (OneCycleLR, CyclicLR): key "beta1", "beta2" (Adam's, and
 * the gains' Adam), "eps", "momentum" (Muon's), "weight_decay", with the ranges and rules of
 * the group spec (a key the group's rule refuses in a spec is refused here too), or "lr"
 * (as mdopt_set_group_lr). Used from the next mdopt_step on; Adam's bias correction takes
 * the current betas with the parameter's step count, as torch's does. Any time after
 * mdopt_add_group of that group. An unknown group or key, a NULL or a bad value is MDOPT_INVALID_ARGUMENT and
 * changes nothing. */
MDOPT_API mdopt_status mdopt_set_group_hparam(mdopt_optimizer* opt, const char* group,
                                              const char* key, double value);

/* Since ABI 1 (minor 4). The group's current value of key: "lr", "gain_lr", "beta1",
 * "beta2", "eps", "momentum", "weight_decay" (the spec's or its preset's, or what a setter
 * set). */
MDOPT_API mdopt_status mdopt_get_group_hparam(const mdopt_optimizer* opt, const char* group,
                                              const char* key, double* value);

/* Registers a tensor; *index_out (may be NULL) receives its index, 0, 1, 2, ... in order.
 * desc->struct_size outside [MDOPT_PARAM_DESC_SIZE_V1, MDOPT_STRUCT_SIZE_MAX] is
 * MDOPT_INVALID_ARGUMENT. */
MDOPT_API mdopt_status mdopt_add_param(mdopt_optimizer* opt, const mdopt_param_desc* desc,
                                       int64_t* index_out);

/* Points a registered parameter at new buffers (same shape and dtypes). For f32 parameters
 * the param buffer is the master copy: it must hold the current weights. grad may be NULL:
 * the parameter has no gradient (see mdopt_step). */
MDOPT_API mdopt_status mdopt_set_pointers(mdopt_optimizer* opt, int64_t index, void* param,
                                          const void* grad);

/* Ends registration, allocates state and projects matrices onto their spheres
 * (unless the group says preserve_init=1), writing the projected weights to the params. */
MDOPT_API mdopt_status mdopt_finalize(mdopt_optimizer* opt);

/* One optimizer step with every group's lr (and gain_lr) multiplied by lr_scale.
 * stream: a cudaStream_t for device=cuda:K (NULL: the legacy default stream), NULL on the
 * CPU; the step is ordered after the work queued on it and before the work queued after the
 * call. Without info the call returns with the step queued (no host wait; with grads=reduced
 * at several ranks it waits for the outcome, see below). info_or_null may be NULL.
 * Non-finite gradients skip the step: nothing changes, info->skipped = 1, the call
 * returns MDOPT_SUCCESS and mdopt_last_error() names the first offending parameter.
 * Since ABI 1 (minor 5; an older library refuses a NULL gradient with MDOPT_INVALID_STATE):
 * a parameter whose gradient pointer is NULL has no gradient this step and is skipped: its
 * weights and every part of its state stay bit for bit as they were, mdopt_group_info
 * counts its matrices as skipped. Since ABI 1 (minor 6) each parameter keeps its own step
 * count, as torch's per-parameter state["step"]: it advances at the steps the parameter
 * takes (applied and with a gradient) and is the t of the bias corrections of its Adam
 * moments (direction and gains); mdopt_get_state's "step" reads it. info->step counts the
 * optimizer's steps, whichever parameters took them. (Minor 5 bias-corrected every
 * parameter with the optimizer's count.)
 * Several ranks: with grads=local a rank without a gradient adds zeros to the mean and the
 * parameter is skipped only when no rank has one; with grads=reduced every rank must pass
 * a gradient or NULL alike, else the step changes nothing on any rank and returns
 * MDOPT_INVALID_ARGUMENT naming the parameter on every rank.
 * info->struct_size outside [MDOPT_STEP_INFO_SIZE_V1, MDOPT_STRUCT_SIZE_MAX] is
 * MDOPT_INVALID_ARGUMENT (and no step is taken). */
MDOPT_API mdopt_status mdopt_step(mdopt_optimizer* opt, double lr_scale, void* stream,
                                  mdopt_step_info* info_or_null);

/* Overlap with the trainer (several ranks, grads=local): the gradients of params
 * [first_index, first_index + count) are final, e.g. from a backward hook. Starts the
 * reduce-scatter of every bucket whose gradients are all final, buckets in their fixed
 * order whatever order the calls come in; mdopt_step starts the rest. The gradient buffers
 * are copied at the call (a NULL gradient as zeros). A no-op on one rank and with
 * grads=reduced. stream: NULL on the CPU. */
MDOPT_API mdopt_status mdopt_grads_ready(mdopt_optimizer* opt, int64_t first_index, int64_t count,
                                         void* stream);

/* gather=deferred: all-gathers the weights the last mdopt_step updated into every rank's
 * model tensors; call it before the next forward (until then each rank's tensors hold only
 * its own rows updated). A no-op with gather=eager and on one rank. */
MDOPT_API mdopt_status mdopt_gather_params(mdopt_optimizer* opt, void* stream);

/* What the last mdopt_step did to the matrices of one group: no silent fallback. A matrix is
 * a 2-D parameter, one expert of a 3-D stack, or a 1-D parameter. Versioned like the
 * structs above (MDOPT_GROUP_STATS_SIZE_V1, MDOPT_GROUP_STATS_INIT); filled by mdopt_group_info. */
typedef struct {
  size_t struct_size;
  int64_t matrices;       /* in the group */
  int64_t orthogonalized; /* Newton-Schulz runs */
  int64_t projected;      /* put back onto their sphere */
  int64_t gain_stepped;   /* whose gains took an Adam step */
  int64_t skipped;        /* not updated: all when the step was skipped (NaN/Inf), else
                           * those whose parameter had no gradient (NULL on every rank) */
  /* mean over the group's matrices that stepped of ||W_after - W_before||_F / ||W_before||_F; NaN unless
   * mdopt_create was given update_norms=1 (it costs a copy of the weights per step) */
  double mean_relative_update;
  /* New fields go here, at the end, and nowhere else. */
} mdopt_group_stats;

#define MDOPT_GROUP_STATS_SIZE_V1                                 \
  ((size_t)(offsetof(mdopt_group_stats, mean_relative_update) + \
            sizeof(((mdopt_group_stats*)0)->mean_relative_update)))
#define MDOPT_GROUP_STATS_INIT { sizeof(mdopt_group_stats), 0, 0, 0, 0, 0, 0.0 }

/* Fills *out for the group named `group`, for the last step (zeros before the first).
 * Collective at several ranks (every rank calls it, same group): the counts and norms are
 * summed over ranks. */
MDOPT_API mdopt_status mdopt_group_info(const mdopt_optimizer* opt, const char* group,
                                        mdopt_group_stats* out);

/* Checkpoints: a directory with a manifest and one state file per rank (see docs/ABI.md).
 * Collective. save writes atomically (temporary names, fsync, rename, manifest last); load
 * works at any rank count (it reshards), verifies checksums, format version and layout on
 * every rank before it changes anything, then restores the state and writes the restored
 * weights to the params. */
MDOPT_API mdopt_status mdopt_save(mdopt_optimizer* opt, const char* dir);
MDOPT_API mdopt_status mdopt_load(mdopt_optimizer* opt, const char* dir);

/* Bytes of optimizer state this rank holds (master copies, moments, gains, radii),
 * excluding the model's own tensors and transient workspace. Valid after finalize. */
MDOPT_API mdopt_status mdopt_state_bytes(const mdopt_optimizer* opt, int64_t* bytes);

/* Bytes of transient workspace (Newton-Schulz buffers, partial sums) this rank holds. */
MDOPT_API mdopt_status mdopt_workspace_bytes(const mdopt_optimizer* opt, int64_t* bytes);

/* Reads one part of a parameter's state as float64, for inspection and logging.
 * field: "master" (the weights, numel), "direction" (W / gains, numel),
 *        "gain_row" (E*d_out), "gain_col" (E*d_in), "gain_scalar" (E) (effective gains),
 *        "radius" (one per sphere slice), and (since ABI 1 minor 4; an older library refuses
 *        the name) the moments "momentum" (Muon), "exp_avg", "exp_avg_sq" (Adam) (numel),
 *        and (since ABI 1 minor 6; an older library refuses the name) "step" (1: the
 *        parameter's own step count, see mdopt_step; the same on every rank, so not
 *        collective). count must equal the field's length;
 * *count_out (may be NULL) receives the length (call with out = NULL to query it). */
MDOPT_API mdopt_status mdopt_get_state(const mdopt_optimizer* opt, int64_t index,
                                       const char* field, double* out, int64_t count,
                                       int64_t* count_out);

/* The shard plan as text for people (which rank holds which rows of every matrix, who runs
 * each Newton-Schulz, the buckets, per-rank state and Newton-Schulz cost, their imbalance).
 * Writes at most `size` bytes including the terminating NUL into `buf` (may be NULL with
 * size 0); *needed_or_null receives the size the whole text needs. Valid after finalize. */
MDOPT_API mdopt_status mdopt_describe_plan(const mdopt_optimizer* opt, char* buf, size_t size,
                                           size_t* needed_or_null);

/* The shard plan for programs, as one JSON object: {"world": N, "slots": [{"param", "expert",
 * "m", "n", "layout" ("rows" | "owner"), "muon" (runs Newton-Schulz), "owner" (the rank
 * holding an owner-layout matrix, or a rows-layout Muon matrix's Newton-Schulz owner),
 * "block_rows", "bucket"}, ...]} — the form stored in checkpoint manifests; later versions
 * may add keys. Buffer rules as mdopt_describe_plan. Valid after finalize. */
MDOPT_API mdopt_status mdopt_plan_json(const mdopt_optimizer* opt, char* buf, size_t size,
                                       size_t* needed_or_null);

/* Frees the optimizer. NULL is accepted and ignored. */
MDOPT_API mdopt_status mdopt_destroy(mdopt_optimizer* opt);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_OPTIMIZER_H_ */
