/*
 * mentions(data, start, end) -> bool: whether data[start:end] contains "advisory_" or
 * "ADVISORY_", the test protocol/advisory.py runs on every Query text in transaction
 * pooling mode.
 *
 * bytes.find() with bounds parses its arguments into a tuple first (METH_VARARGS), which
 * cost more than the search itself on a short text: two of them added about 0.35 us to
 * each simple-protocol transaction. memmem() on the bytes' buffer does the same search
 * without that. Built by `make compiled` beside the mypyc modules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h> /* memmem: Python.h defines _GNU_SOURCE */

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
    const char *text = PyBytes_AS_STRING(args[0]) + start;
    size_t length = (size_t)(end - start);
    if (memmem(text, length, "advisory_", 9) != NULL ||
        memmem(text, length, "ADVISORY_", 9) != NULL) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyMethodDef advisory_methods[] = {
    {"mentions", (PyCFunction)(void (*)(void))mentions, METH_FASTCALL,
     "mentions(data, start, end, /) -> bool: data[start:end] contains \"advisory_\" or"
     " \"ADVISORY_\"."},
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
