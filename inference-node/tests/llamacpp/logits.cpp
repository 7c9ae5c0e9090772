// Prints llama.cpp's logits for a GGUF model as JSON, for
// tests/python/make_llamacpp_golden.py: the prompt's token ids are fed in
// one batch, then `gen` tokens are chosen greedily one at a time. Output:
// {"prompt": [...], "tokens": [...], "logits": [[...], ...]} where logits[i]
// follows position i (prompt positions, then each generated token's input),
// for the first `keep` positions; "tokens" holds every greedy choice.
// Build: g++ -O2 -std=c++17 logits.cpp -I$LLAMA/include -I$LLAMA/ggml/include \
//   $LLAMA/build/src/libllama.a $LLAMA/build/ggml/src/libggml*.a -lpthread -fopenmp
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

static void print_row(const float *l, int n) {
    printf("[");
    for (int j = 0; j < n; j++) printf(j ? ",%.7g" : "%.7g", l[j]);
    printf("]");
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf GEN KEEP ID [ID...]\n", argv[0]);
        return 2;
    }
    const int gen = atoi(argv[2]), keep = atoi(argv[3]);
    std::vector<llama_token> prompt;
    for (int i = 4; i < argc; i++) prompt.push_back(atoi(argv[i]));
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    // No AMX/repacked weight buffers: on the AMX machine these goldens were
    // made on, this build's ggml_backend_amx_mul_mat segfaults; the plain
    // CPU path is ggml's reference vec_dot kernels.
    mp.use_extra_bufts = false;
    llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = prompt.size() + gen + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = cp.n_threads_batch = 2;
    // f32 K/V as copyhold keeps them: the comparison is about the weights.
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context *ctx = llama_init_from_model(model, cp);
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch b = llama_batch_init(prompt.size(), 0, 1);
    for (size_t i = 0; i < prompt.size(); i++) {
        b.token[i] = prompt[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = prompt.size();
    if (llama_decode(ctx, b)) return 1;
    std::vector<std::vector<float>> rows;
    for (size_t i = 0; i < prompt.size(); i++) {
        const float *l = llama_get_logits_ith(ctx, i);
        rows.emplace_back(l, l + nv);
    }
    std::vector<llama_token> out;
    int pos = prompt.size();
    for (int g = 0; g < gen; g++) {
        const std::vector<float> &last = rows.back();
        int best = 0;
        for (int j = 1; j < nv; j++) if (last[j] > last[best]) best = j;
        out.push_back(best);
        if (g + 1 == gen) break;
        llama_batch one = llama_batch_get_one(&out.back(), 1);
        if (llama_decode(ctx, one)) return 1;
        const float *l = llama_get_logits_ith(ctx, -1);
        rows.emplace_back(l, l + nv);
        pos++;
    }
    printf("{\"prompt\":[");
    for (size_t i = 0; i < prompt.size(); i++) printf(i ? ",%d" : "%d", prompt[i]);
    printf("],\"tokens\":[");
    for (size_t i = 0; i < out.size(); i++) printf(i ? ",%d" : "%d", out[i]);
    printf("],\"logits\":[");
    for (int i = 0; i < (int)rows.size() && i < keep; i++) {
        if (i) printf(",");
        print_row(rows[i].data(), nv);
    }
    printf("]}\n");
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
