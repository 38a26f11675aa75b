/*
 * resume(coro, value) -> bool: one step of a coroutine its connection drives itself
 * (net/suspend.py), True when the coroutine has finished.
 *
 * `coro.send(value)` reports the end of a coroutine by raising StopIteration. In the
 * compiled build the caller's `except StopIteration` is expensive: before handling the
 * exception, mypyc adds the caller's line to its traceback, which builds a code object
 * and a frame, and the exception is then normalized into an object. That happened at the
 * end of every client login. PyIter_Send reports the end as a return status instead, so
 * no exception reaches the caller. Errors raised by the coroutine propagate unchanged.
 * Built by `make compiled` beside the mypyc modules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
resume(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "resume() takes 2 arguments (coro, value), %zd given",
                     nargs);
        return NULL;
    }
    PyObject *result = NULL;
    PySendResult status = PyIter_Send(args[0], args[1], &result);
    if (status == PYGEN_ERROR) {
        return NULL;
    }
    /* What the coroutine yielded (its suspend marker) or returned: not wanted. */
    Py_XDECREF(result);
    if (status == PYGEN_RETURN) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyMethodDef resume_methods[] = {
    {"resume", (PyCFunction)(void (*)(void))resume, METH_FASTCALL,
     "resume(coro, value, /) -> bool: send value into coro; True once it has finished."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef resume_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pg_doorman.net._resume",
    .m_doc = "One coroutine step without StopIteration (see _resume.c).",
    .m_size = 0,
    .m_methods = resume_methods,
};

PyMODINIT_FUNC
PyInit__resume(void)
{
    return PyModuleDef_Init(&resume_module);
}
