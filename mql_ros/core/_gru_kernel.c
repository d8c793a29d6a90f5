/* The GRU's step loops over packed windows, compiled (networks._run and networks._backward).
 *
 * Why C: at the update's sizes (hidden 30, <= 256 live rows per step, 50 steps) each step is a few
 * microseconds of arithmetic, so numpy's per-call cost dominated the GRU time. Here one call runs a whole
 * pass. Layout is feature-major, as in networks.py: a (features, rows) array per encoder, and step t's live
 * rows are the first counts[t] rows, stored at columns offsets[t] .. offsets[t] + counts[t] of the packed
 * (features, total) arrays. Gate order r, z, n as in PyTorch's nn.GRU. float32 throughout.
 *
 * The logistic and tanh are a range-reduced exp (Cody-Waite split of ln 2, degree-7 polynomial) written
 * so the compiler vectorizes them; their error is a few float32 ulps of the exp, far below the 1e-5 the
 * batched and one-step contexts must agree to (test/test_core_nets_context.py checks both against numpy).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x; /* comparisons, not fminf/fmaxf: these vectorize, and keep a NaN a NaN */
    x = x > 88.0f ? 88.0f : x;
    float kf = rintf(x * 1.44269504088896341f);
    float r = x - kf * 0.693145751953125f;
    r = r - kf * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)kf + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

/* Tiles of the matmul below: RB output rows by JB columns, accumulated in registers over the inner
 * dimension (a row-at-a-time loop would load and store the output once per input). */
#define JB 32
#define RB 6

static inline __attribute__((always_inline)) void tile(int rb, const float *restrict w, int c,
                                                       const float *restrict b, const float *restrict h,
                                                       Py_ssize_t ld_h, float *restrict out, Py_ssize_t ld_out,
                                                       int width) {
    float acc[RB][JB];
    for (int q = 0; q < rb; q++)
        for (int jj = 0; jj < JB; jj++) acc[q][jj] = b ? b[q] : 0.0f;
    for (int i = 0; i < c; i++) {
        const float *restrict hi = h + i * ld_h;
        for (int q = 0; q < rb; q++) {
            float wq = w[(Py_ssize_t)q * c + i];
            for (int jj = 0; jj < JB; jj++) acc[q][jj] += wq * hi[jj];
        }
    }
    for (int q = 0; q < rb; q++)
        for (int jj = 0; jj < width; jj++) out[q * ld_out + jj] = acc[q][jj];
}

/* g[o, j] = b[o] + sum_i w[o, i] h[i, j] for the first n columns; w is (rows_w, c), h (c, ld_h). pad: c * JB
 * scratch for the last, partial column tile (reads stay inside h's n columns). */
static void matmul_cols(const float *restrict w, const float *restrict b, int rows_w, int c,
                        const float *restrict h, Py_ssize_t ld_h, Py_ssize_t n, float *restrict g, Py_ssize_t ld_g,
                        float *restrict pad) {
    for (Py_ssize_t j0 = 0; j0 < n; j0 += JB) {
        int width = n - j0 < JB ? (int)(n - j0) : JB;
        const float *src = h + j0;
        Py_ssize_t ld = ld_h;
        if (width < JB) {
            for (int i = 0; i < c; i++)
                for (int jj = 0; jj < JB; jj++) pad[i * JB + jj] = jj < width ? h[i * ld_h + j0 + jj] : 0.0f;
            src = pad;
            ld = JB;
        }
        int o = 0;
        for (; o + RB <= rows_w; o += RB)
            tile(RB, w + (Py_ssize_t)o * c, c, b ? b + o : NULL, src, ld, g + o * ld_g + j0, ld_g, width);
        for (; o < rows_w; o++)
            tile(1, w + (Py_ssize_t)o * c, c, b ? b + o : NULL, src, ld, g + o * ld_g + j0, ld_g, width);
    }
}

/* The gates of one hidden unit over n rows: writes the state entering the step, r, z, n and W_hn h + b_hn,
 * and moves h to the new state. */
static void gates(Py_ssize_t n, const float *restrict gir, const float *restrict giz, const float *restrict gin,
                  const float *restrict ghr, const float *restrict ghz, const float *restrict ghn_now,
                  float *restrict hi, float *restrict pi, float *restrict ri, float *restrict zi,
                  float *restrict ni, float *restrict gni) {
    for (Py_ssize_t j = 0; j < n; j++) {
        float r = sigmoid(gir[j] + ghr[j]);
        float z = sigmoid(giz[j] + ghz[j]);
        float cand = tanh_approx(gin[j] + r * ghn_now[j]);
        float hp = hi[j];
        pi[j] = hp;
        ri[j] = r;
        zi[j] = z;
        ni[j] = cand;
        gni[j] = ghn_now[j];
        hi[j] = cand + z * (hp - cand);
    }
}

/* One encoder's forward over all steps. xt: (ed, total) the packed entries, feature-major; w_ih: (3c, ed) on
 * raw entries; h: (c, batch), zero on entry, each row's final state on exit; prev, new, ghn: (c, total); rz:
 * (2c, total); gi: (3c, total), g: (3c, batch) and pad: (max(3c, ed), JB) scratch. The input projections
 * W_ih x + b_ih of all steps come first, in one pass (they do not depend on h). */
static void forward_one(const float *xt, const float *w_ih, const float *b_ih, int ed, const float *w_hh,
                        const float *b_hh, int c, Py_ssize_t total, Py_ssize_t batch, const int64_t *counts,
                        const int64_t *offsets, Py_ssize_t steps, float *h, float *prev, float *rz, float *new_,
                        float *ghn, float *gi, float *g, float *pad) {
    matmul_cols(w_ih, b_ih, 3 * c, ed, xt, total, total, gi, total, pad);
    for (Py_ssize_t t = 0; t < steps; t++) {
        Py_ssize_t n = counts[t], off = offsets[t];
        matmul_cols(w_hh, b_hh, 3 * c, c, h, batch, n, g, batch, pad);
        for (int i = 0; i < c; i++) {
            Py_ssize_t at = i * total + off;
            gates(n, gi + at, gi + c * total + at, gi + 2 * c * total + at, g + i * batch,
                  g + (c + i) * batch, g + (2 * c + i) * batch, h + i * batch, prev + at, rz + at,
                  rz + c * total + at, new_ + at, ghn + at);
        }
    }
}

/* The gradients at one hidden unit's gates over n rows, from d, the gradient on its new state. */
static void gate_grads(Py_ssize_t n, const float *restrict d, const float *restrict pi, const float *restrict ri,
                       const float *restrict zi, const float *restrict ni, const float *restrict gni,
                       float *restrict dr, float *restrict dz, float *restrict dn, float *restrict hr,
                       float *restrict hz, float *restrict hn) {
    for (Py_ssize_t j = 0; j < n; j++) {
        float r = ri[j], z = zi[j], cand = ni[j];
        float dcand = d[j] * (1.0f - z) * (1.0f - cand * cand);
        float dri = dcand * gni[j] * r * (1.0f - r);
        float dzi = d[j] * (pi[j] - cand) * z * (1.0f - z);
        dn[j] = dcand;
        dr[j] = dri;
        dz[j] = dzi;
        hr[j] = dri;
        hz[j] = dzi;
        hn[j] = dcand * r;
    }
}

static void backward_one(float *dh, const float *w_t, int c, Py_ssize_t total, Py_ssize_t batch,
                         const int64_t *counts, const int64_t *offsets, Py_ssize_t steps, const float *prev,
                         const float *rz, const float *new_, const float *ghn, float *d_gi, float *d_gh,
                         float *acc, float *pad) {
    Py_ssize_t ct = (Py_ssize_t)c * total;
    for (Py_ssize_t t = steps - 1; t >= 0; t--) {
        Py_ssize_t n = counts[t], off = offsets[t];
        for (int i = 0; i < c; i++) {
            Py_ssize_t at = i * total + off;
            gate_grads(n, dh + i * batch, prev + at, rz + at, rz + ct + at, new_ + at, ghn + at, d_gi + at,
                       d_gi + ct + at, d_gi + 2 * ct + at, d_gh + at, d_gh + ct + at, d_gh + 2 * ct + at);
        }
        /* dh <- dh * z + W_hh^T d_gh, through a scratch copy as every row of dh feeds d_gh above */
        matmul_cols(w_t, NULL, c, 3 * c, d_gh + off, total, n, acc, batch, pad);
        for (int i = 0; i < c; i++) {
            float *restrict di = dh + i * batch;
            const float *restrict zi = rz + ct + i * total + off, *restrict ai = acc + i * batch;
            for (Py_ssize_t j = 0; j < n; j++) di[j] = di[j] * zi[j] + ai[j];
        }
    }
}

/* ---- Python glue: buffers are checked for size and float32/int64 format before any write ---------- */

static int get(PyObject *obj, Py_buffer *view, int writable, const char *fmt, Py_ssize_t n, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (strcmp(view->format, fmt) != 0 && !(fmt[0] == 'q' && strcmp(view->format, "l") == 0 &&
                                            view->itemsize == 8)) {
        PyErr_Format(PyExc_TypeError, "%s: expected format '%s', got '%s'", name, fmt, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len != n * view->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd elements, got %zd", name, n, view->len / view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int check_steps(const int64_t *counts, const int64_t *offsets, Py_ssize_t steps, Py_ssize_t total,
                       Py_ssize_t batch) {
    for (Py_ssize_t t = 0; t < steps; t++) {
        if (counts[t] < 0 || counts[t] > batch || offsets[t] < 0 || offsets[t] + counts[t] > total) {
            PyErr_Format(PyExc_ValueError, "step %zd: %lld rows at offset %lld do not fit batch %zd, total %zd",
                         t, (long long)counts[t], (long long)offsets[t], batch, total);
            return -1;
        }
    }
    return 0;
}

#define NBUF 12

static void release(Py_buffer *v, int n) {
    for (int i = 0; i < n; i++) PyBuffer_Release(&v[i]);
}

/* All n buffers, or none (an exception set): int64 at counts_at and counts_at + 1, writable from first_out. */
static int get_all(PyObject **o, Py_buffer *v, int n, const char *const *names, const Py_ssize_t *sizes,
                   int counts_at, int first_out) {
    for (int i = 0; i < n; i++) {
        const char *fmt = (i == counts_at || i == counts_at + 1) ? "q" : "f";
        if (get(o[i], &v[i], i >= first_out, fmt, sizes[i], names[i]) < 0) {
            release(v, i);
            return -1;
        }
    }
    return 0;
}

static int check_dims(int k, int c, int ed, Py_ssize_t total, Py_ssize_t batch, Py_ssize_t steps) {
    if (k < 0 || c < 1 || ed < 1 || total < 0 || batch < 0 || steps < 0) {
        PyErr_Format(PyExc_ValueError, "bad sizes k=%d c=%d e=%d total=%zd batch=%zd steps=%zd", k, c, ed, total,
                     batch, steps);
        return -1;
    }
    return 0;
}

static PyObject *gru_forward(PyObject *self, PyObject *args) {
    PyObject *o[NBUF];
    int k, c, ed;
    Py_ssize_t total, batch, steps;
    if (!PyArg_ParseTuple(args, "iiinnnOOOOOOOOOOOO", &k, &c, &ed, &total, &batch, &steps, &o[0], &o[1], &o[2],
                          &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11]))
        return NULL;
    if (check_dims(k, c, ed, total, batch, steps) < 0) return NULL;
    /* xt, w_ih, b_ih, w_hh, b_hh, counts, offsets | h, prev, rz, new, ghn */
    const char *names[] = {"xt", "w_ih", "b_ih", "w_hh", "b_hh", "counts", "offsets", "h", "prev", "rz", "new",
                           "ghn"};
    Py_ssize_t ct = (Py_ssize_t)c * total;
    Py_ssize_t sizes[] = {(Py_ssize_t)ed * total, (Py_ssize_t)k * 3 * c * ed, (Py_ssize_t)k * 3 * c,
                          (Py_ssize_t)k * 3 * c * c, (Py_ssize_t)k * 3 * c, steps, steps, (Py_ssize_t)k * c * batch,
                          k * ct, k * 2 * ct, k * ct, k * ct};
    Py_buffer v[NBUF];
    if (get_all(o, v, 12, names, sizes, 5, 7) < 0) return NULL;
    const int64_t *counts = v[5].buf, *offsets = v[6].buf;
    float *scratch = NULL;
    int inner = ed > 3 * c ? ed : 3 * c;
    if (check_steps(counts, offsets, steps, total, batch) == 0) {
        scratch = PyMem_Malloc(sizeof(float) * ((Py_ssize_t)3 * c * (total + batch) + (Py_ssize_t)inner * JB));
        if (!scratch) PyErr_NoMemory();
    }
    if (scratch) {
        Py_BEGIN_ALLOW_THREADS
        for (int q = 0; q < k; q++) {
            forward_one(v[0].buf, (float *)v[1].buf + (Py_ssize_t)3 * c * ed * q, (float *)v[2].buf + 3 * c * q, ed,
                        (float *)v[3].buf + (Py_ssize_t)3 * c * c * q, (float *)v[4].buf + 3 * c * q, c, total, batch,
                        counts, offsets, steps, (float *)v[7].buf + (Py_ssize_t)c * batch * q,
                        (float *)v[8].buf + ct * q, (float *)v[9].buf + 2 * ct * q, (float *)v[10].buf + ct * q,
                        (float *)v[11].buf + ct * q, scratch, scratch + 3 * ct,
                        scratch + 3 * ct + (Py_ssize_t)3 * c * batch);
        }
        Py_END_ALLOW_THREADS
        PyMem_Free(scratch);
    }
    release(v, 12);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *gru_backward(PyObject *self, PyObject *args) {
    PyObject *o[NBUF];
    int c;
    Py_ssize_t total, batch, steps;
    if (!PyArg_ParseTuple(args, "innnOOOOOOOOOO", &c, &total, &batch, &steps, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    if (check_dims(0, c, 1, total, batch, steps) < 0) return NULL;
    /* w_t, counts, offsets, prev, rz, new, ghn | dh, d_gi, d_gh */
    const char *names[] = {"w_t", "counts", "offsets", "prev", "rz", "new", "ghn", "dh", "d_gi", "d_gh"};
    Py_ssize_t ct = (Py_ssize_t)c * total;
    Py_ssize_t sizes[] = {(Py_ssize_t)3 * c * c, steps, steps, ct, 2 * ct, ct, ct, (Py_ssize_t)c * batch,
                          3 * ct, 3 * ct};
    Py_buffer v[NBUF];
    if (get_all(o, v, 10, names, sizes, 1, 7) < 0) return NULL;
    const int64_t *counts = v[1].buf, *offsets = v[2].buf;
    float *acc = NULL;
    if (check_steps(counts, offsets, steps, total, batch) == 0) {
        acc = PyMem_Malloc(sizeof(float) * c * (batch + 3 * JB));
        if (!acc) PyErr_NoMemory();
    }
    if (acc) {
        Py_BEGIN_ALLOW_THREADS
        backward_one(v[7].buf, v[0].buf, c, total, batch, counts, offsets, steps, v[3].buf, v[4].buf, v[5].buf,
                     v[6].buf, v[8].buf, v[9].buf, acc, acc + c * batch);
        Py_END_ALLOW_THREADS
        PyMem_Free(acc);
    }
    release(v, 10);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gru_forward", gru_forward, METH_VARARGS,
     "gru_forward(k, c, e, total, batch, steps, xt, w_ih, b_ih, w_hh, b_hh, counts, offsets, h, prev, rz, new, ghn)"},
    {"gru_backward", gru_backward, METH_VARARGS,
     "gru_backward(c, total, batch, steps, w_t, counts, offsets, prev, rz, new, ghn, dh, d_gi, d_gh)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gru_kernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gru_kernel(void) { return PyModule_Create(&module); }
