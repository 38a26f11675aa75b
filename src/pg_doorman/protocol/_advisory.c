/*
 * mentions(data, start, end) -> bool: whether data[start:end] contains "advisory_" in
 * any mix of case, the test protocol/advisory.py runs on every Query text in
 * transaction pooling mode.
 *
 * bytes.find() with bounds parses its arguments into a tuple first (METH_VARARGS), which
 * cost more than the search itself on a short text. Here memchr() finds each "_" (a
 * query has few) and the eight bytes before it are compared with "advisory", each
 * letter ORed with 0x20, which maps only 'A'-'Z' onto 'a'-'z'. Built by `make compiled`
 * beside the mypyc modules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int
advisory_before(const unsigned char *s)
{
    return (s[0] | 0x20) == 'a' && (s[1] | 0x20) == 'd' && (s[2] | 0x20) == 'v' &&
           (s[3] | 0x20) == 'i' && (s[4] | 0x20) == 's' && (s[5] | 0x20) == 'o' &&
           (s[6] | 0x20) == 'r' && (s[7] | 0x20) == 'y';
}

static PyObject *
mentions(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "mentions() takes 3 arguments (data, start, end), %zd given",
                     nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "mentions() needs bytes");
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
    if (end - start < 9) {
        Py_RETURN_FALSE;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(args[0]) + start;
    const unsigned char *limit = text + (end - start);
    const unsigned char *p = text + 8; /* an "_" with room for "advisory" before it */
    while (p < limit && (p = memchr(p, '_', (size_t)(limit - p))) != NULL) {
        if (advisory_before(p - 8)) {
            Py_RETURN_TRUE;
        }
        p++;
    }
    Py_RETURN_FALSE;
}

static PyMethodDef advisory_methods[] = {
    {"mentions", (PyCFunction)(void (*)(void))mentions, METH_FASTCALL,
     "mentions(data, start, end, /) -> bool: data[start:end] contains \"advisory_\" in any"
     " case."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef advisory_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pg_doorman.protocol._advisory",
    .m_doc = "The first test of protocol/advisory.py, without bytes.find's overhead.",
    .m_size = 0,
    .m_methods = advisory_methods,
};

PyMODINIT_FUNC
PyInit__advisory(void)
{
    return PyModuleDef_Init(&advisory_module);
}
