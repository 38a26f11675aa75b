/*
 * send_now(fd, data) -> int: one non-blocking send(2) that keeps the GIL.
 *
 * os.write and socket.send release the GIL around the system call and take it back
 * after: about 400 instructions of mutex and condition-variable work each time, twice
 * per transaction in the pooler, for a call that never waits. MSG_DONTWAIT makes sure
 * it never does, whatever the descriptor's own flags say, so holding the GIL is safe.
 * MSG_NOSIGNAL: a peer that went away is an EPIPE error, not a SIGPIPE.
 *
 * Returns the number of bytes the kernel took; 0 when the socket's buffer is full
 * (EAGAIN) or the call was interrupted, so the caller hands the rest to its transport;
 * raises OSError for any other error. Built by `make compiled` beside the mypyc modules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static PyObject *
send_now(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "send_now() takes 2 arguments (fd, data), %zd given",
                     nargs);
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "send_now(): invalid file descriptor %ld", fd);
        return NULL;
    }
    PyObject *data = args[1];
    ssize_t sent;
    if (PyBytes_CheckExact(data)) {
        sent = send((int)fd, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                    MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    else {
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        sent = send((int)fd, view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
        int saved = errno;
        PyBuffer_Release(&view);
        errno = saved;
    }
    if (sent < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            return PyLong_FromLong(0);
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef send_methods[] = {
    {"send_now", (PyCFunction)(void (*)(void))send_now, METH_FASTCALL,
     "send_now(fd, data, /) -> int: bytes sent, 0 if the socket is full; keeps the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef send_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pg_doorman.net._send",
    .m_doc = "A non-blocking socket send that keeps the GIL (see _send.c).",
    .m_size = 0,
    .m_methods = send_methods,
};

PyMODINIT_FUNC
PyInit__send(void)
{
    return PyModuleDef_Init(&send_module);
}
