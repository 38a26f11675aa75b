/*
 * candidates(data, start, end) -> int: which of the words protocol/text_effects.py
 * looks for data[start:end] contains, in any mix of case, as bits: 1 "advisory_",
 * 2 "set_config", 4 "temp". That module runs it on every Query text in transaction
 * pooling mode, and reads further only the texts it reports.
 *
 * bytes.find() with bounds parses its arguments into a tuple first (METH_VARARGS), which
 * cost more than the search itself on a short text. Here memchr() finds each "_" (a
 * query has few) and the bytes around it are compared with "advisory" before it, or
 * "set" before and "config" after; then each "p" and "P" with "tem" before it. Each
 * letter is ORed with 0x20, which maps only 'A'-'Z' onto 'a'-'z'. Built by `make
 * compiled` beside the mypyc modules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define SEEN_ADVISORY 1
#define SEEN_SET_CONFIG 2
#define SEEN_TEMP 4

static int
folded_equal(const unsigned char *s, const char *lower, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if ((s[i] | 0x20) != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return 1;
}

/* Whether text[0:size] holds "tem" just before some `letter` (the last of "temp"). */
static int
temp_before(const unsigned char *text, Py_ssize_t size, int letter)
{
    const unsigned char *limit = text + size;
    const unsigned char *p = text + 3;
    while (p < limit && (p = memchr(p, letter, (size_t)(limit - p))) != NULL) {
        if (folded_equal(p - 3, "tem", 3)) {
            return 1;
        }
        p++;
    }
    return 0;
}

static PyObject *
candidates(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "candidates() takes 3 arguments (data, start, end), %zd given", nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "candidates() needs bytes");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* Bounds as slicing takes them, for the non-negative ones the callers pass. */
    if (start < 0) {
        start = 0;
    }
    if (end > size) {
        end = size;
    }
    if (end - start < 4) {
        return PyLong_FromLong(0);
    }
    Py_ssize_t length = end - start;
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(args[0]) + start;
    const unsigned char *limit = text + length;
    long found = 0;
    const unsigned char *p = text + 3; /* an "_" with room for "set" before it */
    while (p < limit && (p = memchr(p, '_', (size_t)(limit - p))) != NULL) {
        if (p - text >= 8 && folded_equal(p - 8, "advisory", 8)) {
            found |= SEEN_ADVISORY;
        }
        else if (limit - p >= 7 && folded_equal(p - 3, "set", 3) &&
                 folded_equal(p + 1, "config", 6)) {
            found |= SEEN_SET_CONFIG;
        }
        if (found == (SEEN_ADVISORY | SEEN_SET_CONFIG)) {
            break;
        }
        p++;
    }
    if (temp_before(text, length, 'p') || temp_before(text, length, 'P')) {
        found |= SEEN_TEMP;
    }
    return PyLong_FromLong(found);
}

static PyMethodDef text_effects_methods[] = {
    {"candidates", (PyCFunction)(void (*)(void))candidates, METH_FASTCALL,
     "candidates(data, start, end, /) -> int: 1 if data[start:end] contains \"advisory_\","
     " 2 \"set_config\", 4 \"temp\", in any case; ORed."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef text_effects_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pg_doorman.protocol._text_effects",
    .m_doc = "The first test of protocol/text_effects.py, without bytes.find's overhead.",
    .m_size = 0,
    .m_methods = text_effects_methods,
};

PyMODINIT_FUNC
PyInit__text_effects(void)
{
    return PyModuleDef_Init(&text_effects_module);
}
