/*
 * Compiled RWKV World tokenizer: greedy longest match over bytes.
 *
 * Built as `rwkv_train._world_tokenizer`; `rwkv_train/tokenizer.py` wraps it and
 * keeps a pure-Python implementation of the same algorithm as the fallback and
 * the test oracle.
 *
 * The vocabulary is stored as a double-array trie: every trie node is a cell, and
 * the child of cell s for byte c is cell t = base[s] + c. Every node has its own
 * base, so t belongs to s exactly when t's label (the byte that leads to it) is c:
 * a cell is one uint32 (base << 9 | label + 1, 0 for a free cell), and the whole
 * World vocabulary takes about 470 KB, which stays in a core's L2 cache. A step
 * is one load and one compare, with no search among children.
 *
 * Apart from the cells, `matches` records for every cell the longest token that
 * ends on the path from the root to it (its id and length). The encoder walks as
 * far as the input allows and reads the answer off the cell where it stopped,
 * with no branch per byte for "is this a token?".
 *
 * The GIL is released while long inputs are encoded, so several Python threads
 * can tokenize at once.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Inputs at least this long are encoded with the GIL released. */
#define NOGIL_BYTES 16384
/* Token ids are written as uint16, so a vocabulary holds at most this many ids. */
#define MAX_IDS 65536
/* A cell packs base (23 bits) and label + 1 (9 bits). */
#define LABEL_BITS 9
#define LABEL_MASK ((1u << LABEL_BITS) - 1)
#define MAX_CELLS (1u << (32 - LABEL_BITS))

typedef struct {
    PyObject_HEAD
    uint32_t *cells;         /* base << LABEL_BITS | (label + 1); 0: free */
    uint32_t *matches;       /* per cell: id | len << 16 of the longest token ending on its path */
    uint32_t root_base;      /* the root's children are cells root_base + byte */
    uint32_t num_cells;
    uint32_t num_ids;        /* len(tokens) given to the constructor */
    uint32_t max_id;         /* the largest id with a non-empty token */
    uint32_t max_token_len;
    char *blob;              /* all token bytes, concatenated by id */
    uint32_t *offsets;       /* token i is blob[offsets[i]:offsets[i + 1]] */
    PyObject **ints;         /* a cached int object per id: filling a list is then one incref per token */
} Trie;

/* ------------------------------------------------------------------------------------------ */
/* Building the double array                                                                  */

typedef struct {
    const unsigned char *data;
    uint32_t len;
    uint32_t id;
} Token;

static int
token_cmp(const void *pa, const void *pb)
{
    const Token *a = pa, *b = pb;
    uint32_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->data, b->data, n);
    if (c != 0)
        return c;
    if (a->len != b->len)
        return a->len < b->len ? -1 : 1;
    /* Equal tokens: the larger id sorts last and wins. */
    return a->id < b->id ? -1 : (a->id > b->id);
}

/* A trie node waiting for its children to be placed: its cell, the sorted tokens [lo, hi)
 * that extend its prefix of `depth` bytes, and the longest token that ends on its path. */
typedef struct {
    uint32_t cell, lo, hi, depth, match;
} Pending;

/* Free cells are kept on a doubly linked list, so the search for a base skips used cells.
 * A free cell that many nodes could not use (their base would be taken or a sibling's cell
 * used) is dropped from the list and left empty, or the searches would keep stumbling on it. */
#define END_OF_LIST UINT32_MAX
#define MAX_MISSES 255

typedef struct {
    uint32_t *base;
    uint32_t *matches;
    uint16_t *label;        /* label + 1 of a used cell, 0 when free */
    unsigned char *taken;   /* bases already given to a node */
    uint32_t *next, *prev;  /* the free list */
    unsigned char *listed;  /* on the free list */
    unsigned char *misses;  /* searches this free cell failed */
    uint32_t head, tail;
    uint32_t cap;
    uint32_t top;           /* one past the highest used cell */
} Builder;

static void
builder_free(Builder *b)
{
    PyMem_Free(b->base);
    PyMem_Free(b->matches);
    PyMem_Free(b->label);
    PyMem_Free(b->taken);
    PyMem_Free(b->next);
    PyMem_Free(b->prev);
    PyMem_Free(b->listed);
    PyMem_Free(b->misses);
}

#define GROW(ptr, type, cap)                                          \
    do {                                                              \
        type *p_ = PyMem_Realloc((ptr), (size_t)(cap) * sizeof(type)); \
        if (p_ == NULL) {                                             \
            PyErr_NoMemory();                                         \
            return -1;                                                \
        }                                                             \
        (ptr) = p_;                                                   \
    } while (0)

/* Make cells [0, need) addressable; new cells are free and join the end of the free list. */
static int
builder_reserve(Builder *b, uint64_t need)
{
    if (need <= b->cap)
        return 0;
    if (need > MAX_CELLS) {
        PyErr_SetString(PyExc_ValueError, "vocabulary too large for the tokenizer's trie");
        return -1;
    }
    uint64_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    if (cap > MAX_CELLS)
        cap = MAX_CELLS;
    GROW(b->base, uint32_t, cap);
    GROW(b->matches, uint32_t, cap);
    GROW(b->label, uint16_t, cap);
    GROW(b->taken, unsigned char, cap);
    GROW(b->next, uint32_t, cap);
    GROW(b->prev, uint32_t, cap);
    GROW(b->listed, unsigned char, cap);
    GROW(b->misses, unsigned char, cap);
    for (uint32_t i = b->cap; i < (uint32_t)cap; i++) {
        b->base[i] = 0;
        b->matches[i] = 0;
        b->label[i] = 0;
        b->taken[i] = 0;
        b->misses[i] = 0;
        b->listed[i] = 1;
        b->prev[i] = b->tail;
        b->next[i] = END_OF_LIST;
        if (b->tail == END_OF_LIST)
            b->head = i;
        else
            b->next[b->tail] = i;
        b->tail = i;
    }
    b->cap = (uint32_t)cap;
    return 0;
}

static void
builder_unlist(Builder *b, uint32_t t)
{
    if (!b->listed[t])
        return;
    b->listed[t] = 0;
    if (b->prev[t] == END_OF_LIST)
        b->head = b->next[t];
    else
        b->next[b->prev[t]] = b->next[t];
    if (b->next[t] == END_OF_LIST)
        b->tail = b->prev[t];
    else
        b->prev[b->next[t]] = b->prev[t];
}

/* A base not yet given to another node such that base + c is free for every child byte c
 * in `bytes` (sorted, n >= 1); the search starts at the lowest free cell. */
static int
builder_find_base(Builder *b, const unsigned char *bytes, int n, uint32_t *out)
{
    uint32_t pos = b->head;
    for (;;) {
        /* Room for base + 255 behind the candidate, and a free cell after it on the list. */
        if (builder_reserve(b, (uint64_t)pos + 2 * 256) < 0)
            return -1;
        uint32_t following = b->next[pos];
        if (pos >= bytes[0]) {
            uint32_t base = pos - bytes[0];
            int ok = base != 0 && !b->taken[base]; /* base 0 would make the root (cell 0) a child */
            for (int k = 1; k < n && ok; k++)
                ok = b->label[base + bytes[k]] == 0;
            if (ok) {
                *out = base;
                return 0;
            }
            if (++b->misses[pos] >= MAX_MISSES)
                builder_unlist(b, pos);
        }
        pos = following;
    }
}

static int
trie_build(Trie *self, Token *tokens, uint32_t num_tokens)
{
    int status = -1;
    Builder b = {0};
    b.head = b.tail = END_OF_LIST;
    Pending *queue = NULL;
    uint32_t queue_len = 0, queue_cap = 1024, head = 0;
    uint32_t *leaves = NULL; /* cells without children: their base is set once the size is known */
    uint32_t num_leaves = 0;

    qsort(tokens, num_tokens, sizeof(Token), token_cmp);
    if (builder_reserve(&b, 4096) < 0)
        goto done;
    queue = PyMem_Malloc(queue_cap * sizeof(Pending));
    leaves = PyMem_Malloc(((size_t)num_tokens + 1) * sizeof(uint32_t));
    if (queue == NULL || leaves == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    b.label[0] = 1; /* the root: marked used, though it is nobody's child */
    builder_unlist(&b, 0);
    b.top = 1;
    queue[queue_len++] = (Pending){0, 0, num_tokens, 0, 0};

    /* Breadth first, so the shallow cells that nearly every step touches sit together. */
    while (head < queue_len) {
        Pending node = queue[head++];
        uint32_t i = node.lo;
        /* Tokens equal to this node's prefix sort first; the last of them has the largest id. */
        while (i < node.hi && tokens[i].len == node.depth) {
            node.match = tokens[i].id | node.depth << 16;
            i++;
        }
        b.matches[node.cell] = node.match;

        unsigned char bytes[256];
        uint32_t starts[257];
        int n = 0;
        for (uint32_t j = i; j < node.hi; j++) {
            unsigned char c = tokens[j].data[node.depth];
            if (n == 0 || bytes[n - 1] != c) {
                bytes[n] = c;
                starts[n] = j;
                n++;
            }
        }
        starts[n] = node.hi;
        if (n == 0) {
            leaves[num_leaves++] = node.cell;
            continue;
        }
        uint32_t base;
        if (builder_find_base(&b, bytes, n, &base) < 0)
            goto done;
        b.base[node.cell] = base;
        b.taken[base] = 1;
        if (queue_len + (uint32_t)n > queue_cap) {
            uint32_t cap = queue_cap * 2 + (uint32_t)n;
            Pending *q = PyMem_Realloc(queue, cap * sizeof(Pending));
            if (q == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            queue = q;
            queue_cap = cap;
        }
        for (int k = 0; k < n; k++) {
            uint32_t t = base + bytes[k];
            b.label[t] = (uint16_t)(bytes[k] + 1);
            builder_unlist(&b, t);
            if (t + 1 > b.top)
                b.top = t + 1;
            queue[queue_len++] = (Pending){t, starts[k], starts[k + 1], node.depth + 1, node.match};
        }
    }

    /* The single-byte tokens: without every one of them some inputs could not be encoded. */
    for (int c = 0; c < 256; c++) {
        uint32_t t = b.base[0] + (uint32_t)c;
        if (b.label[t] != c + 1 || b.matches[t] >> 16 != 1) {
            PyErr_Format(PyExc_ValueError,
                         "the vocabulary has no single-byte token for byte %d; every byte needs one", c);
            goto done;
        }
    }

    /* Leaves point at 256 free cells past the end, where no label ever matches. Every other
     * base is below top, so base + 255 stays inside the array and the encoder needs no
     * bounds checks. */
    uint32_t num_cells = b.top + 256;
    if (builder_reserve(&b, num_cells) < 0)
        goto done;
    for (uint32_t k = 0; k < num_leaves; k++)
        b.base[leaves[k]] = b.top;
    self->cells = PyMem_Malloc((size_t)num_cells * sizeof(uint32_t));
    self->matches = PyMem_Malloc((size_t)num_cells * sizeof(uint32_t));
    if (self->cells == NULL || self->matches == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (uint32_t t = 0; t < num_cells; t++) {
        /* The root keeps label 0: it is nobody's child. */
        self->cells[t] = b.base[t] << LABEL_BITS | (t == 0 ? 0u : b.label[t]);
        self->matches[t] = b.matches[t];
    }
    self->root_base = b.base[0];
    self->num_cells = num_cells;
    status = 0;

done:
    builder_free(&b);
    PyMem_Free(queue);
    PyMem_Free(leaves);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding                                                                                   */

/* Growable uint16 output; raw allocation, so it can grow with the GIL released. */
typedef struct {
    uint16_t *data;
    size_t len, cap;
} Ids;

static int
ids_reserve(Ids *ids, size_t need)
{
    if (need <= ids->cap)
        return 0;
    size_t cap = ids->cap ? ids->cap : 64;
    while (cap < need)
        cap *= 2;
    uint16_t *data = PyMem_RawRealloc(ids->data, cap * sizeof(uint16_t));
    if (data == NULL)
        return -1;
    ids->data = data;
    ids->cap = cap;
    return 0;
}

/* Append the ids of data[0:n] to `ids`; -1 when out of memory. Needs no GIL. */
static int
encode_into(const Trie *trie, const unsigned char *data, size_t n, Ids *ids)
{
    /* Capacity for about 3 bytes per token up front; grow (rarely) when the text is denser. */
    if (ids_reserve(ids, ids->len + n / 3 + 16) < 0)
        return -1;
    uint16_t *out = ids->data + ids->len;
    uint16_t *out_end = ids->data + ids->cap;
    const uint32_t *cells = trie->cells;
    const uint32_t *matches = trie->matches;
    const uint32_t root_base = trie->root_base;
    size_t pos = 0;
    while (pos < n) {
        /* Every byte is a token, so the first step always succeeds. */
        uint32_t s = root_base + data[pos];
        uint32_t cell = cells[s];
        size_t i = pos + 1;
        while (i < n) {
            uint32_t c = data[i];
            uint32_t t = (cell >> LABEL_BITS) + c;
            uint32_t next = cells[t];
            if ((next & LABEL_MASK) != c + 1)
                break;
            s = t;
            cell = next;
            i++;
        }
        if (out == out_end) {
            size_t len = (size_t)(out - ids->data);
            ids->len = len;
            if (ids_reserve(ids, len + (n - pos) / 2 + 16) < 0)
                return -1;
            out = ids->data + len;
            out_end = ids->data + ids->cap;
        }
        uint32_t match = matches[s];
        *out++ = (uint16_t)match;
        pos += match >> 16;
    }
    ids->len = (size_t)(out - ids->data);
    return 0;
}

/* A byte view of `obj`: str (as UTF-8), or any object with the buffer protocol. `keep` holds
 * a temporary UTF-8 copy and `view` a buffer export, whichever the view needs until
 * byteview_release. */
typedef struct {
    const unsigned char *data;
    size_t len;
    PyObject *keep;
    Py_buffer view;
    int has_view;
} ByteView;

static int
byteview_get(PyObject *obj, ByteView *bv, int allow_str, int allow_buffer)
{
    bv->keep = NULL;
    bv->has_view = 0;
    if (PyUnicode_Check(obj)) {
        if (!allow_str) {
            PyErr_SetString(PyExc_TypeError, "expected bytes, got str (use encode for text)");
            return -1;
        }
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(obj) < 0)
            return -1;
#endif
        if (PyUnicode_IS_ASCII(obj)) {
            /* ASCII text is already its own UTF-8: read it in place. */
            bv->data = (const unsigned char *)PyUnicode_DATA(obj);
            bv->len = (size_t)PyUnicode_GET_LENGTH(obj);
            return 0;
        }
        /* A temporary UTF-8 copy (not the string's cached one, which would live as long as
         * the string); raises on lone surrogates, exactly as str.encode("utf-8") does. */
        PyObject *b = PyUnicode_AsUTF8String(obj);
        if (b == NULL)
            return -1;
        bv->keep = b;
        bv->data = (const unsigned char *)PyBytes_AS_STRING(b);
        bv->len = (size_t)PyBytes_GET_SIZE(b);
        return 0;
    }
    if (!allow_buffer) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyBytes_Check(obj)) {
        bv->data = (const unsigned char *)PyBytes_AS_STRING(obj);
        bv->len = (size_t)PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &bv->view, PyBUF_SIMPLE) < 0)
        return -1;
    bv->has_view = 1;
    bv->data = (const unsigned char *)bv->view.buf;
    bv->len = (size_t)bv->view.len;
    return 0;
}

static void
byteview_release(ByteView *bv)
{
    if (bv->has_view)
        PyBuffer_Release(&bv->view);
    bv->has_view = 0;
    Py_CLEAR(bv->keep);
}

static PyObject *
ids_to_list(const Trie *self, const uint16_t *ids, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    PyObject **ints = self->ints;
    for (size_t i = 0; i < n; i++) {
        PyObject *v = ints[ids[i]];
        Py_INCREF(v);
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

/* Encode one str or bytes-like object into `ids`, releasing the GIL when it is long. */
static int
encode_object(Trie *self, PyObject *obj, int allow_str, int allow_buffer, Ids *ids)
{
    ByteView bv;
    if (byteview_get(obj, &bv, allow_str, allow_buffer) < 0)
        return -1;
    int rc;
    if (bv.len >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        rc = encode_into(self, bv.data, bv.len, ids);
        Py_END_ALLOW_THREADS
    }
    else {
        rc = encode_into(self, bv.data, bv.len, ids);
    }
    byteview_release(&bv);
    if (rc < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *
encode_to_list(Trie *self, PyObject *obj, int allow_str, int allow_buffer)
{
    Ids ids = {0};
    PyObject *result = NULL;
    if (encode_object(self, obj, allow_str, allow_buffer, &ids) == 0)
        result = ids_to_list(self, ids.data, ids.len);
    PyMem_RawFree(ids.data);
    return result;
}

static PyObject *
Trie_encode(Trie *self, PyObject *text)
{
    return encode_to_list(self, text, 1, 0);
}

static PyObject *
Trie_encode_bytes(Trie *self, PyObject *data)
{
    return encode_to_list(self, data, 0, 1);
}

static PyObject *
Trie_encode_u16(Trie *self, PyObject *obj)
{
    Ids ids = {0};
    PyObject *result = NULL;
    if (encode_object(self, obj, 1, 1, &ids) == 0)
        result = PyByteArray_FromStringAndSize((const char *)ids.data, (Py_ssize_t)(ids.len * sizeof(uint16_t)));
    PyMem_RawFree(ids.data);
    return result;
}

static PyObject *
Trie_encode_batch(Trie *self, PyObject *texts)
{
    PyObject *seq = PySequence_Fast(texts, "encode_batch expects a sequence of str");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    ByteView *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(ByteView));
    size_t *ends = PyMem_Malloc((n ? (size_t)n : 1) * sizeof(size_t));
    Ids ids = {0};
    PyObject *result = NULL;
    Py_ssize_t got = 0;
    size_t total = 0;
    int rc = 0;
    if (views == NULL || ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (byteview_get(items[got], &views[got], 1, 0) < 0)
            goto done;
        total += views[got].len;
    }
    /* All texts in one pass, the GIL released once for the whole batch when it is long. */
    PyThreadState *saved = total >= NOGIL_BYTES ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t k = 0; k < n && rc == 0; k++) {
        rc = encode_into(self, views[k].data, views[k].len, &ids);
        ends[k] = ids.len;
    }
    if (saved != NULL)
        PyEval_RestoreThread(saved);
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        size_t start = k ? ends[k - 1] : 0;
        PyObject *list = ids_to_list(self, ids.data + start, ends[k] - start);
        if (list == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, k, list);
    }

done:
    for (Py_ssize_t k = 0; k < got; k++)
        byteview_release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(ends);
    PyMem_RawFree(ids.data);
    Py_DECREF(seq);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding                                                                                   */

static int
check_id(const Trie *self, long long v)
{
    if (v < 0 || v > (long long)self->max_id) {
        PyErr_Format(PyExc_ValueError, "token id %lld is not in the vocabulary (valid ids 0..%u)", v,
                     self->max_id);
        return -1;
    }
    return 0;
}

/* Ids from a one-dimensional contiguous integer buffer (numpy array, array.array, memoryview):
 * 1 converted, 0 when `obj` is not such a buffer, -1 on a bad id. */
static int
ids_from_buffer(const Trie *self, PyObject *obj, uint32_t **out, size_t *n)
{
    if (PyBytes_Check(obj) || PyByteArray_Check(obj) || !PyObject_CheckBuffer(obj))
        return 0;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return 0;
    }
    const char *fmt = view.format ? view.format : "B";
    if (*fmt == '@' || *fmt == '=' || *fmt == '<')
        fmt++;
    char f = fmt[0];
    int is_signed = (f == 'b' || f == 'h' || f == 'i' || f == 'l' || f == 'q');
    int known = is_signed || f == 'B' || f == 'H' || f == 'I' || f == 'L' || f == 'Q';
    size_t size = (size_t)view.itemsize;
    if (view.ndim != 1 || !known || fmt[1] != '\0' ||
        !(size == 1 || size == 2 || size == 4 || size == 8)) {
        PyBuffer_Release(&view);
        return 0;
    }
    size_t count = (size_t)(view.len / view.itemsize);
    uint32_t *ids = PyMem_Malloc((count ? count : 1) * sizeof(uint32_t));
    if (ids == NULL) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    const char *p = view.buf;
    for (size_t i = 0; i < count; i++, p += size) {
        long long v;
        if (size == 1)
            v = is_signed ? (long long)*(const int8_t *)p : (long long)*(const uint8_t *)p;
        else if (size == 2) {
            uint16_t u;
            memcpy(&u, p, 2);
            v = is_signed ? (long long)(int16_t)u : (long long)u;
        }
        else if (size == 4) {
            uint32_t u;
            memcpy(&u, p, 4);
            v = is_signed ? (long long)(int32_t)u : (long long)u;
        }
        else {
            uint64_t u;
            memcpy(&u, p, 8);
            v = (is_signed || u <= (uint64_t)INT64_MAX) ? (long long)(int64_t)u : (long long)INT64_MAX;
        }
        if (check_id(self, v) < 0) {
            PyMem_Free(ids);
            PyBuffer_Release(&view);
            return -1;
        }
        ids[i] = (uint32_t)v;
    }
    PyBuffer_Release(&view);
    *out = ids;
    *n = count;
    return 1;
}

static int
ids_from_sequence(const Trie *self, PyObject *obj, uint32_t **out, size_t *n)
{
    PyObject *seq = PySequence_Fast(obj, "decode expects a sequence of token ids");
    if (seq == NULL)
        return -1;
    size_t count = (size_t)PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint32_t *ids = PyMem_Malloc((count ? count : 1) * sizeof(uint32_t));
    if (ids == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < count; i++) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
        if (v == -1 && PyErr_Occurred())
            goto fail;
        if (overflow)
            v = overflow > 0 ? LLONG_MAX : LLONG_MIN;
        if (check_id(self, v) < 0)
            goto fail;
        ids[i] = (uint32_t)v;
    }
    Py_DECREF(seq);
    *out = ids;
    *n = count;
    return 0;
fail:
    PyMem_Free(ids);
    Py_DECREF(seq);
    return -1;
}

static PyObject *
Trie_decode_bytes(Trie *self, PyObject *obj)
{
    uint32_t *ids = NULL;
    size_t n = 0;
    int got = ids_from_buffer(self, obj, &ids, &n);
    if (got < 0)
        return NULL;
    if (got == 0 && ids_from_sequence(self, obj, &ids, &n) < 0)
        return NULL;
    const uint32_t *offsets = self->offsets;
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += offsets[ids[i] + 1] - offsets[ids[i]];
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (result != NULL) {
        char *dst = PyBytes_AS_STRING(result);
        for (size_t i = 0; i < n; i++) {
            uint32_t a = offsets[ids[i]], len = offsets[ids[i] + 1] - a;
            memcpy(dst, self->blob + a, len);
            dst += len;
        }
    }
    PyMem_Free(ids);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* The Trie type                                                                              */

static void
Trie_dealloc(Trie *self)
{
    if (self->ints != NULL) {
        for (uint32_t i = 0; i < self->num_ids; i++)
            Py_XDECREF(self->ints[i]);
        PyMem_Free(self->ints);
    }
    PyMem_Free(self->cells);
    PyMem_Free(self->matches);
    PyMem_Free(self->blob);
    PyMem_Free(self->offsets);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Trie_init(Trie *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", NULL};
    PyObject *tokens_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Trie", kwlist, &tokens_obj))
        return -1;
    if (self->cells != NULL || self->offsets != NULL || self->ints != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Trie is already initialised");
        return -1;
    }
    PyObject *seq = PySequence_Fast(tokens_obj, "tokens must be a sequence of bytes, indexed by id");
    if (seq == NULL)
        return -1;
    Py_ssize_t num_ids = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Token *tokens = NULL;
    int status = -1;
    if (num_ids > MAX_IDS) {
        PyErr_Format(PyExc_ValueError, "at most %d token ids fit uint16, got %zd", MAX_IDS, num_ids);
        goto done;
    }
    tokens = PyMem_Malloc((num_ids ? (size_t)num_ids : 1) * sizeof(Token));
    self->offsets = PyMem_Malloc(((size_t)num_ids + 1) * sizeof(uint32_t));
    self->ints = PyMem_Calloc(num_ids ? (size_t)num_ids : 1, sizeof(PyObject *));
    if (tokens == NULL || self->offsets == NULL || self->ints == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    self->num_ids = (uint32_t)num_ids;

    size_t total = 0;
    uint32_t num_tokens = 0;
    for (Py_ssize_t i = 0; i < num_ids; i++) {
        if (!PyBytes_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "token %zd is %.100s, expected bytes", i, Py_TYPE(items[i])->tp_name);
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(items[i]);
        if (len > 65535) {
            PyErr_Format(PyExc_ValueError, "token %zd is %zd bytes long; at most 65535 are supported", i, len);
            goto done;
        }
        self->offsets[i] = (uint32_t)total;
        total += (size_t)len;
        if (total > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "the vocabulary's tokens exceed 4 GiB in total");
            goto done;
        }
        if (len > 0) {
            if (i == 0) {
                /* Id 0 is written for "no token" inside the trie, so it cannot be a token. */
                PyErr_SetString(PyExc_ValueError, "id 0 must have an empty token (it ends a document)");
                goto done;
            }
            const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(items[i]);
            tokens[num_tokens++] = (Token){data, (uint32_t)len, (uint32_t)i};
            self->max_id = (uint32_t)i;
            if ((uint32_t)len > self->max_token_len)
                self->max_token_len = (uint32_t)len;
        }
        self->ints[i] = PyLong_FromSsize_t(i);
        if (self->ints[i] == NULL)
            goto done;
    }
    self->offsets[num_ids] = (uint32_t)total;
    self->blob = PyMem_Malloc(total ? total : 1);
    if (self->blob == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < num_ids; i++)
        memcpy(self->blob + self->offsets[i], PyBytes_AS_STRING(items[i]), PyBytes_GET_SIZE(items[i]));

    if (trie_build(self, tokens, num_tokens) < 0)
        goto done;
    status = 0;

done:
    PyMem_Free(tokens);
    Py_DECREF(seq);
    return status;
}

static PyObject *
Trie_get_num_cells(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->num_cells);
}

static PyObject *
Trie_get_max_token_len(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->max_token_len);
}

static PyObject *
Trie_get_max_id(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->max_id);
}

static PyGetSetDef Trie_getset[] = {
    {"num_cells", (getter)Trie_get_num_cells, NULL, "cells in the double array", NULL},
    {"max_token_len", (getter)Trie_get_max_token_len, NULL, "longest token in bytes", NULL},
    {"max_id", (getter)Trie_get_max_id, NULL, "largest id with a non-empty token", NULL},
    {NULL},
};

static PyMethodDef Trie_methods[] = {
    {"encode", (PyCFunction)Trie_encode, METH_O, "encode(text: str) -> list[int]: ids of the UTF-8 bytes of text"},
    {"encode_bytes", (PyCFunction)Trie_encode_bytes, METH_O, "encode_bytes(data: bytes-like) -> list[int]"},
    {"encode_batch", (PyCFunction)Trie_encode_batch, METH_O, "encode_batch(texts: sequence of str) -> list[list[int]]"},
    {"encode_u16", (PyCFunction)Trie_encode_u16, METH_O,
     "encode_u16(data: str | bytes-like) -> bytearray: the ids as native-endian uint16"},
    {"decode_bytes", (PyCFunction)Trie_decode_bytes, METH_O,
     "decode_bytes(ids) -> bytes; ValueError on an id outside 0..max_id"},
    {NULL},
};

static PyTypeObject TrieType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rwkv_train._world_tokenizer.Trie",
    .tp_basicsize = sizeof(Trie),
    .tp_dealloc = (destructor)Trie_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trie(tokens): greedy longest-match tokenizer over bytes; tokens[i] is the bytes of id i "
              "(empty: unused). Id 0 must be unused.",
    .tp_methods = Trie_methods,
    .tp_getset = Trie_getset,
    .tp_init = (initproc)Trie_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef world_tokenizer_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rwkv_train._world_tokenizer",
    .m_doc = "Compiled greedy longest-match byte tokenizer (double-array trie).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__world_tokenizer(void)
{
    if (PyType_Ready(&TrieType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&world_tokenizer_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TrieType);
    if (PyModule_AddObject(m, "Trie", (PyObject *)&TrieType) < 0) {
        Py_DECREF(&TrieType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
