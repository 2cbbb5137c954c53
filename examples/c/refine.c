/*
 * Segments and refines a small synthetic CT through libtis, then checks that misuse is refused.
 *
 *   cc -std=c11 examples/c/refine.c -Iinclude -Ltarget/release -ltis -o refine
 *   LD_LIBRARY_PATH=target/release ./refine [MODEL.safetensors [Z Y X]]
 *
 * Without a model it uses the one embedded in the library; the phantom is 24 x 48 x 48 voxels
 * unless Z Y X are given.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tis.h"

#define CHECK(call)                                                                            \
    do {                                                                                       \
        TisStatus status_ = (call);                                                            \
        if (status_ != TIS_OK) {                                                               \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)status_, tis_last_error());    \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

/* Expects `call` to fail with `expected`, and a message to say why. */
#define REFUSED(call, expected)                                                                \
    do {                                                                                       \
        TisStatus status_ = (call);                                                            \
        if (status_ != (expected) || tis_last_error() == NULL) {                               \
            fprintf(stderr, "%s returned %d, expected %d\n", #call, (int)status_, (int)(expected)); \
            return 1;                                                                          \
        }                                                                                      \
        printf("  refused as expected: %s\n", tis_last_error());                               \
    } while (0)

static int Z = 24, Y = 48, X = 48;

/* Air around an elliptic body of soft tissue with a brighter organ in it (HU). */
static void phantom(float *ct) {
    for (int z = 0; z < Z; ++z)
        for (int y = 0; y < Y; ++y)
            for (int x = 0; x < X; ++x) {
                float dy = (y - Y / 2.0f) / (Y * 0.45f), dx = (x - X / 2.0f) / (X * 0.45f);
                float oy = (y - Y * 0.4f) / 8.0f, ox = (x - X * 0.6f) / 10.0f, oz = (z - Z / 2.0f) / 6.0f;
                float v = dy * dy + dx * dx < 1.0f ? 40.0f : -1000.0f;
                if (oy * oy + ox * ox + oz * oz < 1.0f) v = 80.0f;
                ct[(z * Y + y) * X + x] = v + (float)((x * 7 + y * 13 + z * 29) % 11) - 5.0f;
            }
}

static void count(const char *what, const uint16_t *labels, size_t n, int classes) {
    printf("%s:", what);
    for (int c = 0; c < classes; ++c) {
        size_t k = 0;
        for (size_t i = 0; i < n; ++i) k += labels[i] == c;
        printf(" class %d %zu", c, k);
    }
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc > 4) {
        Z = atoi(argv[2]);
        Y = atoi(argv[3]);
        X = atoi(argv[4]);
        if (Z < 4 || Y < 8 || X < 8) return 2;
    }
    printf("libtis %s\n", tis_version());
    const size_t n = (size_t)Z * Y * X;
    const int64_t dims[3] = {Z, Y, X};
    const int64_t bad_dims[3] = {0, Y, X};
    const double spacing[3] = {3.0, 3.0, 3.0};
    float *ct = malloc(n * sizeof *ct);
    uint16_t *labels = malloc(n * sizeof *labels);
    if (!ct || !labels) return 1;
    phantom(ct);

    TisModel *model = NULL;
    if (argc > 1)
        CHECK(tis_model_load(argv[1], TIS_DEVICE_CPU, &model));
    else
        CHECK(tis_model_load_default(TIS_DEVICE_CPU, &model));
    int32_t classes = 0;
    CHECK(tis_model_class_count(model, &classes));
    const char *name = NULL;
    CHECK(tis_model_class_name(model, classes - 1, &name));
    printf("model: %d classes, the last is \"%s\"\n", classes, name);

    TisSession *session = NULL;
    CHECK(tis_session_create(model, ct, TIS_DTYPE_F32, dims, spacing, &session));
    int64_t shape[3];
    CHECK(tis_session_dims(session, shape));
    printf("session on %lld x %lld x %lld voxels\n", (long long)shape[0], (long long)shape[1], (long long)shape[2]);
    CHECK(tis_session_labels(session, labels, n));
    count("automatic", labels, n, classes);

    TisBox box;
    double ms = 0;
    CHECK(tis_session_click(session, Z / 2, (int64_t)(Y * 0.4), (int64_t)(X * 0.6), 1));
    CHECK(tis_session_changed_box(session, &box));
    CHECK(tis_session_last_latency_ms(session, &ms));
    printf("click: changed box start (%lld, %lld, %lld) size (%lld, %lld, %lld) in %.1f ms\n",
           (long long)box.start[0], (long long)box.start[1], (long long)box.start[2],
           (long long)box.size[0], (long long)box.size[1], (long long)box.size[2], ms);
    CHECK(tis_session_click(session, Z / 2, 5, 5, 0));
    CHECK(tis_session_labels(session, labels, n));
    count("refined", labels, n, classes);
    CHECK(tis_session_undo(session));
    CHECK(tis_session_reset(session));

    printf("misuse:\n");
    REFUSED(tis_session_click(NULL, 0, 0, 0, 1), TIS_ERROR_NULL_ARGUMENT);
    REFUSED(tis_session_click(session, Z, 0, 0, 1), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_session_click(session, 0, 0, 0, classes), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_session_click(session, -1, 0, 0, 1), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_session_labels(session, labels, n - 1), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_session_undo(session), TIS_ERROR_SESSION);
    REFUSED(tis_session_undo((TisSession *)model), TIS_ERROR_INVALID_HANDLE);
    REFUSED(tis_session_create(model, ct, TIS_DTYPE_F32, bad_dims, spacing, &session), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_session_create(model, ct, 42, dims, spacing, &session), TIS_ERROR_INVALID_ARGUMENT);
    REFUSED(tis_model_load("/nonexistent/model.safetensors", TIS_DEVICE_CPU, &model), TIS_ERROR_IO);
    CHECK(tis_model_free(model)); /* the session keeps the model alive */
    CHECK(tis_session_click(session, Z / 2, Y / 2, X / 2, 1));
    CHECK(tis_session_free(session));
    REFUSED(tis_session_free(session), TIS_ERROR_INVALID_HANDLE);
    REFUSED(tis_model_free(model), TIS_ERROR_INVALID_HANDLE);
    printf("misuse: all rejected\n");

    free(ct);
    free(labels);
    printf("done\n");
    return 0;
}
