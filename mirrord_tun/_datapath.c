/* The per-message packet path in C: what pump.py and sshfast.py do per packet and per SSH
 * message, without the interpreter in between.
 *
 * 1. pump_out: every packet the TUN has ready, read into a frame being built, each behind its
 *    4-byte length, each checked (source address) before it is kept; the frame then goes to 4.
 *    The event loop calls it itself, so a TUN's wake-up runs no Python at all.
 * 2. open_batch: the SSH packets in a received buffer, decrypted with the connection's own key
 *    (libcrypto's AES-GCM through _gcm.c, else cryptography's object), each one that is channel
 *    data on the tunnel's channel and one whole PACKETS frame handed to 3; it stops at the first
 *    that is anything else.
 * 3. tun_write_batch: a PACKETS body split, each packet checked (address, virtio-net header) and
 *    written to the TUN; a malformed body is refused whole, before any packet is written.
 * 4. send_data: the frame 1 built, made one SSH_MSG_CHANNEL_DATA, encrypted (the same way)
 *    and written to the transport, asyncssh's sequence number, rekey count and window advanced
 *    (sshfast.send's checks first: anything it would leave to asyncssh, this leaves too).
 *
 * The Python modules stay the reference and the fallback (no compiler, MIRRORD_NS_NATIVE=0):
 * tests/test_datapath.py runs both on the same inputs, random and hostile, and wants the same
 * packets out and the same counters. Everything here only reads and writes inside the buffers
 * it is given, with every length checked against the buffer before use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "_gcm.h"

#define VNET_HDR_LEN 10 /* netns/tun.py */
#define PACKET_LENGTH 4 /* protocol.PACKET_LENGTH */
#define FRAME_HEADER 5  /* protocol.FRAME_HEADER: length (4), kind (1) */
#define MAX_BODY (1u << 20)
#define SSH_TAG 16
#define MSG_CHANNEL_DATA 94
#define DATA_HEAD 10 /* padding length, type, recipient channel, data length */

/* Why a packet was dropped: the index into the counter names pump.py uses. */
enum { OK = 0, R_MALFORMED, R_IPV6, R_ADDRESS, R_BAD_VNET, R_TUN_FULL, R_REJECTED, N_REASONS };

/* One check of pump._address_is, parsed from its Python description (see _parse_check). */
typedef struct {
    int active;
    Py_ssize_t v4_at, v6_at;   /* offsets in the packet, virtio-net header included */
    Py_buffer v4, v6;          /* the allowed addresses, 4 and 16 bytes each, back to back */
    PyObject *reason;          /* the counter for a packet whose address is not allowed */
} check_t;

static int parse_check(PyObject *spec, check_t *c) {
    memset(c, 0, sizeof(*c));
    if (spec == Py_None)
        return 0;
    if (!PyArg_ParseTuple(spec, "nny*y*U", &c->v4_at, &c->v6_at, &c->v4, &c->v6, &c->reason))
        return -1;
    c->active = 1;
    if (c->v4_at < 0 || c->v6_at < 0 || c->v4_at + 4 > VNET_HDR_LEN + 20 || c->v6_at + 16 > VNET_HDR_LEN + 40
            || c->v4.len % 4 || c->v6.len % 16) {
        PyBuffer_Release(&c->v4);
        PyBuffer_Release(&c->v6);
        c->active = 0;
        PyErr_SetString(PyExc_ValueError, "bad address check");
        return -1;
    }
    return 0;
}

static void release_check(check_t *c) {
    if (c->active) {
        PyBuffer_Release(&c->v4);
        PyBuffer_Release(&c->v6);
    }
}

static int among(const uint8_t *addr, const Py_buffer *set, Py_ssize_t size) {
    const uint8_t *p = set->buf;
    for (Py_ssize_t i = 0; i + size <= set->len; i += size)
        if (!memcmp(p + i, addr, (size_t)size))
            return 1;
    return 0;
}

/* pump._address_is's check(). */
static int check_address(const check_t *c, const uint8_t *pkt, Py_ssize_t len) {
    if (len < VNET_HDR_LEN + 20)
        return R_MALFORMED;
    int version = pkt[VNET_HDR_LEN] >> 4;
    if (version == 4)
        return among(pkt + c->v4_at, &c->v4, 4) ? OK : R_ADDRESS;
    if (version != 6)
        return R_MALFORMED;
    if (c->v6.len == 0)
        return R_IPV6;
    if (len < VNET_HDR_LEN + 40)
        return R_MALFORMED;
    return among(pkt + c->v6_at, &c->v6, 16) ? OK : R_ADDRESS;
}

/* pump.vnet_check(). */
static int check_vnet(const uint8_t *pkt, Py_ssize_t len) {
    Py_ssize_t size = len - VNET_HDR_LEN;
    if (size < 20)
        return R_MALFORMED;
    uint8_t flags = pkt[0], gso = pkt[1];
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
    memcpy(&hdr_len, pkt + 2, 2); /* host byte order, as a legacy TUN writes them */
    memcpy(&gso_size, pkt + 4, 2);
    memcpy(&csum_start, pkt + 6, 2);
    memcpy(&csum_offset, pkt + 8, 2);
    if ((flags & ~0x03) || hdr_len > size || ((flags & 0x01) && (Py_ssize_t)csum_start + csum_offset + 2 > size))
        return R_BAD_VNET;
    if (gso == 0)
        return OK;
    if (gso_size < 48 || !(flags & 0x01) || csum_offset != 16)
        return R_BAD_VNET;
    gso &= (uint8_t)~0x80;
    const uint8_t *ip = pkt + VNET_HDR_LEN;
    if (gso == 0x01)
        return ((ip[0] >> 4) != 4 || ip[9] != 6 || csum_start != (ip[0] & 0x0F) * 4) ? R_BAD_VNET : OK;
    if (gso != 0x04 || (ip[0] >> 4) != 6 || size < 40 || ip[6] != 6 || csum_start != 40)
        return R_BAD_VNET;
    return OK;
}

static const char *const REASONS[N_REASONS] = {
    NULL, "dropped_malformed", "dropped_ipv6", NULL, "dropped_bad_vnet", "dropped_tun_full", "dropped_rejected",
};

/* The drops as {counter name: n}, or None when there were none (the usual case). */
static PyObject *drops_dict(const Py_ssize_t *drops, const check_t *c) {
    PyObject *d = NULL;
    for (int r = 1; r < N_REASONS; r++) {
        if (!drops[r])
            continue;
        if (!d && !(d = PyDict_New()))
            return NULL;
        PyObject *n = PyLong_FromSsize_t(drops[r]);
        int err = !n || (r == R_ADDRESS ? PyDict_SetItem(d, c->reason, n) : PyDict_SetItemString(d, REASONS[r], n));
        Py_XDECREF(n);
        if (err) {
            Py_DECREF(d);
            return NULL;
        }
    }
    if (!d)
        Py_RETURN_NONE;
    return d;
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* One read or write of a packet, without the GIL (as os.read/os.write), retried on EINTR;
 * -1 with *err set on failure. */
static ssize_t tun_io(int writing, int fd, uint8_t *p, size_t n, int *err) {
    ssize_t r;
    Py_BEGIN_ALLOW_THREADS
    do {
        r = writing ? write(fd, p, n) : read(fd, p, n);
    } while (r < 0 && errno == EINTR);
    *err = errno;
    Py_END_ALLOW_THREADS
    return r;
}

/* Reads packets into base[:len], each at *pos + 4 behind its length, while *pos < stop and a
 * whole max_packet still fits; stops when the TUN is drained. The packets kept are counted in
 * *count, the ones `check` refuses in drops. -1 with errno set on an error other than EAGAIN
 * before any packet was read (the device went away); after one, the batch goes out and the next
 * call fails. */
static int read_packets(int fd, uint8_t *base, Py_ssize_t len, Py_ssize_t *pos, Py_ssize_t stop,
                        Py_ssize_t max_packet, const check_t *check, Py_ssize_t *drops, Py_ssize_t *count) {
    while (*pos < stop && *pos + PACKET_LENGTH + max_packet <= len) {
        uint8_t *at = base + *pos + PACKET_LENGTH;
        int err = 0;
        ssize_t n = tun_io(0, fd, at, (size_t)max_packet, &err);
        if (n < 0) {
            if (err == EAGAIN || err == EWOULDBLOCK || *count)
                return 0;
            errno = err;
            return -1;
        }
        if (n == 0)
            return 0;
        int r = check->active ? check_address(check, at, n) : OK;
        if (r) {
            drops[r]++;
            continue;
        }
        put_u32(base + *pos, (uint32_t)n);
        *pos += PACKET_LENGTH + n;
        (*count)++;
    }
    return 0;
}

/* Splits and writes one PACKETS body; -1: malformed (nothing written). */
static Py_ssize_t write_body(int fd, const uint8_t *body, Py_ssize_t len, const check_t *check,
                             Py_ssize_t *drops, Py_ssize_t *size) {
    Py_ssize_t pos = 0;
    while (pos < len) { /* protocol.unpack_packets: all or nothing */
        if (len - pos < PACKET_LENGTH)
            return -1;
        uint32_t n = get_u32(body + pos);
        pos += PACKET_LENGTH;
        if (n == 0 || (Py_ssize_t)n > len - pos)
            return -1;
        pos += n;
    }
    Py_ssize_t count = 0;
    for (pos = 0; pos < len;) {
        Py_ssize_t n = get_u32(body + pos);
        const uint8_t *pkt = body + pos + PACKET_LENGTH;
        pos += PACKET_LENGTH + n;
        int r = check->active ? check_address(check, pkt, n) : OK;
        if (!r)
            r = check_vnet(pkt, n);
        if (r) {
            drops[r]++;
            continue;
        }
        int err;
        if (tun_io(1, fd, (uint8_t *)pkt, (size_t)n, &err) < 0) {
            drops[(err == EAGAIN || err == EWOULDBLOCK) ? R_TUN_FULL : R_REJECTED]++;
            continue;
        }
        count++;
        *size += n;
    }
    return count;
}

/* tun_write_batch(fd, body, check) -> (count, size, drops), count -1 for a malformed body. */
static PyObject *tun_write_batch(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer body;
    PyObject *spec;
    check_t check;
    if (!PyArg_ParseTuple(args, "iy*O", &fd, &body, &spec))
        return NULL;
    if (parse_check(spec, &check) < 0) {
        PyBuffer_Release(&body);
        return NULL;
    }
    Py_ssize_t drops[N_REASONS] = {0}, size = 0;
    Py_ssize_t count = write_body(fd, body.buf, body.len, &check, drops, &size);
    PyObject *d = drops_dict(drops, &check);
    release_check(&check);
    PyBuffer_Release(&body);
    if (!d)
        return NULL;
    return Py_BuildValue("nnN", count, size, d);
}

/* The nonce after this one: the fixed 4 bytes, then the invocation counter + 1 (RFC 5647). */
static void next_nonce(uint8_t *iv) {
    for (int i = 11; i >= 4; i--)
        if (++iv[i])
            break;
}

static PyObject *s_decrypt_into, *s_encrypt_into;

/* One SSH packet's AES-GCM, in place of aead.<method>(nonce, data, aad, out) (cryptography's
 * AESGCM encrypt_into/decrypt_into; 4 bytes of aad: the packet length, as asyncssh authenticates
 * it): through libcrypto when `key` (gcm_key_of) is not None, else through cryptography's object
 * `aead`. -1 with the error (InvalidTag when a packet does not authenticate). */
static int aead_into(PyObject *method, PyObject *key, PyObject *aead, const uint8_t *iv, const void *data,
                     Py_ssize_t data_len, const void *aad, void *out, Py_ssize_t out_len) {
    if (key != Py_None)
        return method == s_encrypt_into ? gcm_seal(key, iv, aad, data, data_len, out)
                                        : gcm_open(key, iv, aad, data, data_len, out);
    PyObject *nonce = PyBytes_FromStringAndSize((const char *)iv, 12);
    PyObject *d = nonce ? PyMemoryView_FromMemory((char *)data, data_len, PyBUF_READ) : NULL;
    PyObject *a = d ? PyMemoryView_FromMemory((char *)aad, 4, PyBUF_READ) : NULL;
    PyObject *o = a ? PyMemoryView_FromMemory(out, out_len, PyBUF_WRITE) : NULL;
    PyObject *r = NULL;
    if (o) {
        PyObject *call[5] = {aead, nonce, d, a, o};
        r = PyObject_VectorcallMethod(method, call, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(nonce);
    Py_XDECREF(d);
    Py_XDECREF(a);
    Py_XDECREF(o);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Random padding from a pool: one getrandom() per 4 KiB, each byte used once (sshfast._Padding). */
static uint8_t pool[4096];
static size_t pool_used = sizeof(pool);

static int padding(uint8_t *to, size_t n) {
    if (pool_used + n > sizeof(pool)) {
        size_t got = 0;
        while (got < sizeof(pool)) {
            ssize_t r = getrandom(pool + got, sizeof(pool) - got, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            got += (size_t)r;
        }
        pool_used = 0;
    }
    memcpy(to, pool + pool_used, n);
    pool_used += n;
    return 0;
}

/* The asyncssh state send_data reads and advances (sshfast.send is the reference; the round
 * trips of tests/test_sshfast.py fail if asyncssh renames any), interned once; what bind() gives. */
static PyObject *s_conn, *s_send_encryption, *s_cipher, *s_mrd_aead, *s_compressor, *s_kex_complete,
    *s_auth_complete, *s_send_state, *s_send_buf, *s_send_window, *s_send_pktsize, *s_transport,
    *s_rekey_bytes_sent, *s_rekey_bytes, *s_rekey_seconds, *s_rekey_time, *s_send_blocksize, *s_send_enchdrlen,
    *s_mrd_out, *s_iv, *s_send_seq, *s_send_chan, *s_write, *s_get_write_buffer_size, *s_open;
static PyObject *gcm_type, *aead_of; /* asyncssh's GCMEncryption, sshfast._aead */
static Py_ssize_t packet_max;
static double keepalive_reset; /* sshfast._KEEPALIVE_RESET: received() leaves a due reset to the Python */

/* bind(GCMEncryption, aead_of, packet_max, keepalive_reset): what the C needs from sshfast, once. */
static PyObject *bind(PyObject *self, PyObject *args) {
    PyObject *type, *of;
    Py_ssize_t max;
    double reset;
    if (!PyArg_ParseTuple(args, "O!Ond", &PyType_Type, &type, &of, &max, &reset))
        return NULL;
    Py_XSETREF(gcm_type, Py_NewRef(type));
    Py_XSETREF(aead_of, Py_NewRef(of));
    packet_max = max;
    keepalive_reset = reset;
    Py_RETURN_NONE;
}

/* getattr(obj, name) as a Py_ssize_t; -1 when it is not an int that fits (no error set) or not
 * there at all (AttributeError set, as Python's own reads of it would raise). */
static Py_ssize_t attr_size(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v)
        return -1;
    Py_ssize_t n = PyLong_Check(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (n < 0)
        PyErr_Clear();
    return n;
}

/* 1 if getattr(obj, name) is true, 0 if false, -1 on an error. */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static int set_size(PyObject *obj, PyObject *name, Py_ssize_t n) {
    PyObject *v = PyLong_FromSsize_t(n);
    int r = v ? PyObject_SetAttr(obj, name, v) : -1;
    Py_XDECREF(v);
    return r;
}

/* Whether asyncssh would send channel data of `size` bytes on chan as one message now, with
 * AES-GCM and nothing queued: sshfast.send's conditions. 1 yes, 0 no, -1 on an error. */
static int can_send(PyObject *conn, PyObject *chan, PyObject *enc, Py_ssize_t size) {
    int t;
    if (Py_TYPE(enc) != (PyTypeObject *)gcm_type || size <= 0)
        return 0;
    if ((t = attr_true(conn, s_compressor)) != 0 || (t = attr_true(conn, s_kex_complete)) != 1
            || (t = attr_true(conn, s_auth_complete)) != 1 || (t = attr_true(chan, s_send_buf)) != 0)
        return t < 0 ? -1 : 0;
    PyObject *state = PyObject_GetAttr(chan, s_send_state);
    if (!state)
        return -1;
    t = PyUnicode_Check(state) && PyUnicode_Compare(state, s_open) == 0;
    Py_DECREF(state);
    if (!t || size > attr_size(chan, s_send_window) || size > attr_size(chan, s_send_pktsize))
        return PyErr_Occurred() ? -1 : 0;
    PyObject *transport = PyObject_GetAttr(conn, s_transport);
    if (!transport)
        return -1;
    t = transport != Py_None;
    Py_DECREF(transport);
    Py_ssize_t sent = attr_size(conn, s_rekey_bytes_sent), limit = attr_size(conn, s_rekey_bytes);
    if (!t || sent < 0 || limit < 0 || sent >= limit)
        return PyErr_Occurred() ? -1 : 0;
    if ((t = attr_true(conn, s_rekey_seconds)) != 0) {
        if (t < 0)
            return -1;
        struct timespec now; /* time.monotonic()'s clock */
        clock_gettime(CLOCK_MONOTONIC, &now);
        PyObject *when = PyObject_GetAttr(conn, s_rekey_time);
        double due = when ? PyFloat_AsDouble(when) : -1.0;
        Py_XDECREF(when);
        if (PyErr_Occurred())
            return -1;
        if ((double)now.tv_sec + now.tv_nsec * 1e-9 >= due)
            return 0;
    }
    return 1;
}

/* conn._mrd_out, the connection's reused output buffer, made at least `size` bytes (sshfast._out_buffer). */
static PyObject *out_buffer(PyObject *conn, Py_ssize_t size) {
    PyObject *out = PyObject_GetAttr(conn, s_mrd_out);
    if (!out)
        PyErr_Clear();
    if (out && PyByteArray_CheckExact(out) && PyByteArray_GET_SIZE(out) >= size)
        return out;
    Py_XDECREF(out);
    out = PyByteArray_FromStringAndSize(NULL, size > packet_max ? size : packet_max);
    if (out && PyObject_SetAttr(conn, s_mrd_out, out) < 0)
        Py_CLEAR(out);
    return out;
}

/* The cipher object's two ways to AES-GCM (see aead_into): *key from gcm_key_of, and *aead,
 * cryptography's object (sshfast._aead, made once per key), only where *key is None. -1 with an
 * error. */
static int keys_of(PyObject *cipher, PyObject *enc, PyObject **key, PyObject **aead) {
    if (!(*key = gcm_key_of(cipher)))
        return -1;
    if (*key != Py_None)
        *aead = Py_NewRef(Py_None);
    else if (!(*aead = PyObject_GetAttr(cipher, s_mrd_aead))) { /* the first message with this key */
        PyErr_Clear();
        if (!(*aead = PyObject_CallOneArg(aead_of, enc)))
            return -1;
    }
    return 0;
}

/* The frame in frame[start:end] as one SSH_MSG_CHANNEL_DATA to `chan` in out[:4 + pktlen + tag]: the
 * message's header written into the DATA_HEAD bytes before the frame, the padding after it,
 * encrypted (aead_into) behind the packet length; cipher._iv advanced. 0 when the
 * frame's buffer has no room around it (nothing written), 1 done, -1 on an error. */
static int seal(PyObject *cipher, PyObject *key, PyObject *aead, Py_buffer *frame, Py_ssize_t start, Py_ssize_t end,
                Py_ssize_t padlen, uint32_t chan, uint8_t *out) {
    Py_ssize_t size = end - start, pktlen = DATA_HEAD + size + padlen;
    if (start < DATA_HEAD || end + padlen > frame->len || size > 0xFFFFFFFFLL)
        return 0;
    PyObject *iv_in = PyObject_GetAttr(cipher, s_iv);
    if (!iv_in)
        return -1;
    int r = -1;
    if (!PyBytes_Check(iv_in) || PyBytes_GET_SIZE(iv_in) != 12) {
        r = 0;
        goto done;
    }
    uint8_t *head = (uint8_t *)frame->buf + start - DATA_HEAD;
    head[0] = (uint8_t)padlen;
    head[1] = MSG_CHANNEL_DATA;
    put_u32(head + 2, chan);
    put_u32(head + 6, (uint32_t)size);
    if (padding((uint8_t *)frame->buf + end, (size_t)padlen) < 0)
        goto done;
    put_u32(out, (uint32_t)pktlen);
    if (aead_into(s_encrypt_into, key, aead, (const uint8_t *)PyBytes_AS_STRING(iv_in), head, pktlen, out, out + 4,
                  pktlen + SSH_TAG) < 0)
        goto done;
    uint8_t iv[12];
    memcpy(iv, PyBytes_AS_STRING(iv_in), 12);
    next_nonce(iv);
    PyObject *next = PyBytes_FromStringAndSize((const char *)iv, 12);
    if (next) {
        r = PyObject_SetAttr(cipher, s_iv, next) < 0 ? -1 : 1;
        Py_DECREF(next);
    }
done:
    Py_DECREF(iv_in);
    return r;
}

/* sshfast.send for a frame built in place (an OutFrame: frame[start:end], with room before and
 * after it), in C: when asyncssh would send it as one message now, it is sealed into the
 * connection's output buffer, written to the transport, and the sequence number, rekey count
 * and window advanced as asyncssh would: 1. 0 (nothing sent, nothing changed) where asyncssh
 * must do it; -1 on an error. */
static int send_frame(PyObject *chan, PyObject *frame_obj, Py_ssize_t start, Py_ssize_t end) {
    if (!gcm_type) {
        PyErr_SetString(PyExc_RuntimeError, "send_data before bind");
        return -1;
    }
    PyObject *conn = NULL, *enc = NULL, *cipher = NULL, *key = NULL, *aead = NULL, *out = NULL, *transport = NULL,
             *view = NULL, *r = NULL;
    int result = -1;
    Py_buffer frame = {0};
    Py_ssize_t size = end - start;
    int ok;
    if (!(conn = PyObject_GetAttr(chan, s_conn)))
        return -1;
    if (conn == Py_None || !(enc = PyObject_GetAttr(conn, s_send_encryption)))
        goto refuse;
    if ((ok = can_send(conn, chan, enc, size)) <= 0)
        goto refuse;
    if (!(cipher = PyObject_GetAttr(enc, s_cipher)) || keys_of(cipher, enc, &key, &aead) < 0)
        goto done;
    Py_ssize_t blocksize = attr_size(conn, s_send_blocksize), enchdrlen = attr_size(conn, s_send_enchdrlen);
    Py_ssize_t chan_id = attr_size(chan, s_send_chan);
    if (blocksize <= 0 || enchdrlen < 0 || chan_id < 0 || chan_id > 0xFFFFFFFFLL)
        goto refuse;
    Py_ssize_t padlen = ((-(enchdrlen + 9 + size)) % blocksize + blocksize) % blocksize;
    if (padlen < 4)
        padlen += blocksize;
    Py_ssize_t pktlen = DATA_HEAD + size + padlen, total = 4 + pktlen + SSH_TAG;
    if (padlen > 255 || !(out = out_buffer(conn, total)))
        goto refuse;
    if (PyObject_GetBuffer(frame_obj, &frame, PyBUF_WRITABLE) < 0)
        goto done;
    if ((ok = seal(cipher, key, aead, &frame, start, end, padlen, (uint32_t)chan_id,
                   (uint8_t *)PyByteArray_AS_STRING(out))) <= 0)
        goto refuse;
    if (!(transport = PyObject_GetAttr(conn, s_transport)) || !(view = PyMemoryView_FromObject(out)))
        goto done;
    Py_SETREF(view, PySequence_GetSlice(view, 0, total));
    if (!view || !(r = PyObject_CallMethodOneArg(transport, s_write, view)))
        goto done;
    Py_SETREF(r, PyObject_CallMethodNoArgs(transport, s_get_write_buffer_size));
    if (!r || ((ok = PyObject_IsTrue(r)) > 0 && PyObject_SetAttr(conn, s_mrd_out, Py_None) < 0) || ok < 0)
        goto done;
    /* Sent at once (the usual case): the buffer is ours again for the next message. Otherwise the
     * transport queued a view of it, and the next message gets a new one. */
    PyObject *seq = PyObject_GetAttr(conn, s_send_seq);
    unsigned long next = seq ? (PyLong_AsUnsignedLongMask(seq) + 1) & 0xFFFFFFFFul : 0;
    Py_XDECREF(seq);
    PyObject *next_seq = seq && !PyErr_Occurred() ? PyLong_FromUnsignedLong(next) : NULL;
    ok = next_seq && PyObject_SetAttr(conn, s_send_seq, next_seq) == 0;
    Py_XDECREF(next_seq);
    if (!ok || set_size(conn, s_rekey_bytes_sent, attr_size(conn, s_rekey_bytes_sent) + pktlen) < 0
            || set_size(chan, s_send_window, attr_size(chan, s_send_window) - size) < 0)
        goto done;
    result = 1;
    goto done;
refuse:
    if (!PyErr_Occurred())
        result = 0;
done:
    if (frame.obj)
        PyBuffer_Release(&frame);
    Py_XDECREF(conn);
    Py_XDECREF(enc);
    Py_XDECREF(cipher);
    Py_XDECREF(key);
    Py_XDECREF(aead);
    Py_XDECREF(out);
    Py_XDECREF(transport);
    Py_XDECREF(view);
    Py_XDECREF(r);
    return result;
}

/* send_data(chan, frame, start, end) -> bool: send_frame for sshfast.send. */
static PyObject *send_data(PyObject *self, PyObject *args) {
    PyObject *chan, *frame_obj;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "OOnn", &chan, &frame_obj, &start, &end))
        return NULL;
    int r = send_frame(chan, frame_obj, start, end);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* counters[key] += n for a dict (a Counter: a missing key counts 0); -1 on an error. */
static int count(PyObject *counters, PyObject *key, Py_ssize_t n) {
    if (!n)
        return 0;
    PyObject *old = PyDict_GetItemWithError(counters, key);
    Py_ssize_t was = old ? PyLong_AsSsize_t(old) : 0;
    PyObject *now = PyErr_Occurred() ? NULL : PyLong_FromSsize_t(was + n);
    int r = now ? PyDict_SetItem(counters, key, now) : -1;
    Py_XDECREF(now);
    return r;
}

static PyObject *reason_names[N_REASONS]; /* REASONS, interned (R_ADDRESS: the check's own) */

/* counters[reason] += n for each drop; -1 on an error. */
static int count_drops(PyObject *counters, const Py_ssize_t *drops, const check_t *c) {
    for (int r = 1; r < N_REASONS; r++)
        if (drops[r] && count(counters, r == R_ADDRESS ? c->reason : reason_names[r], drops[r]) < 0)
            return -1;
    return 0;
}

static PyObject *s_chan, *s_packets_out, *s_bytes_out, *s_frames_out;

/* pump_out(fd, buf, start, limit, max_packet, check, kind, sender, counters, unsent, gone) -> None
 * A TUN's whole wake-up, called by the event loop itself (TunPump registers it with add_reader):
 * the packets read_packets finds go into buf from `start` on as one frame of `kind` (its header
 * in the FRAME_HEADER bytes before `start`), counted as pump._send_batch counts them, and sent
 * with send_frame on sender.chan.chan (a FrameSession's asyncssh channel; sender None: never).
 * Where send_frame leaves the frame to asyncssh, or there is no channel, unsent(end) sends it
 * through the generic path; a TUN that fails before any packet was read calls gone(). */
static PyObject *pump_out(PyObject *self, PyObject *args) {
    int fd, kind;
    Py_buffer buf;
    Py_ssize_t start, limit, max_packet;
    PyObject *spec, *sender, *counters, *unsent, *gone;
    check_t check;
    if (!PyArg_ParseTuple(args, "iw*nnnOiOO!OO", &fd, &buf, &start, &limit, &max_packet, &spec, &kind, &sender,
                          &PyDict_Type, &counters, &unsent, &gone))
        return NULL;
    if (parse_check(spec, &check) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    PyObject *result = NULL, *fs = NULL, *chan = NULL;
    Py_ssize_t drops[N_REASONS] = {0}, packets = 0, pos = start;
    if (start < FRAME_HEADER || limit > buf.len || max_packet <= 0 || kind < 0 || kind > 255) {
        PyErr_SetString(PyExc_ValueError, "pump_out: bad bounds");
        goto done;
    }
    uint8_t *base = buf.buf;
    int failed = read_packets(fd, base, buf.len, &pos, limit, max_packet, &check, drops, &packets) < 0;
    if (count_drops(counters, drops, &check) < 0)
        goto done;
    if (failed) {
        result = PyObject_CallNoArgs(gone);
        goto done;
    }
    if (!packets) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t body = pos - start;
    put_u32(base + start - FRAME_HEADER, (uint32_t)body); /* protocol.frame_header_into */
    base[start - 1] = (uint8_t)kind;
    if (count(counters, s_packets_out, packets) < 0 || count(counters, s_bytes_out, body - packets * PACKET_LENGTH) < 0
            || count(counters, s_frames_out, 1) < 0)
        goto done;
    int sent = 0;
    if (sender != Py_None) {
        if (!(fs = PyObject_GetAttr(sender, s_chan)) || !(chan = PyObject_GetAttr(fs, s_chan)))
            goto done;
        if (chan != Py_None && (sent = send_frame(chan, buf.obj, start - FRAME_HEADER, pos)) < 0)
            goto done;
    }
    if (sent) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *end = PyLong_FromSsize_t(pos);
        result = end ? PyObject_CallOneArg(unsent, end) : NULL;
        Py_XDECREF(end);
    }
done:
    Py_XDECREF(fs);
    Py_XDECREF(chan);
    release_check(&check);
    PyBuffer_Release(&buf);
    return result;
}

/* The receive side's asyncssh state open_batch reads (and, after, advances). */
static PyObject *s_recv_encryption, *s_max_recv_pktlen, *s_recv_seq, *s_recv_chan, *s_recv_window,
    *s_init_recv_window, *s_packets_in, *s_bytes_in, *s_malformed_frames;

/* What open_packets did: where it stopped in the input, how many messages it delivered, and why it
 * stopped (see open_batch), with the length of a packet it decrypted but left to the caller. */
typedef struct {
    Py_ssize_t pos, messages, stopped_len;
    int stopped;
} opened_t;

/* open_batch's work on the SSH packets in in[start:end]; 0, or -1 with an exception (InvalidTag
 * and friends: the caller ends the connection). */
static int open_packets(const uint8_t *in, Py_ssize_t in_len, Py_ssize_t start, Py_ssize_t end, Py_buffer *plain,
                        PyObject *conn, PyObject *chan_obj, int kind, int fd, const check_t *check,
                        PyObject *counters, opened_t *o) {
    Py_ssize_t drops[N_REASONS] = {0}, consumed = 0, packets = 0, size = 0;
    int decrypted = 0, result = -1;
    uint8_t iv[12];
    PyObject *enc = NULL, *cipher = NULL, *key = NULL, *aead = NULL, *iv_in = NULL;
    memset(o, 0, sizeof(*o));
    Py_ssize_t max_pktlen = attr_size(conn, s_max_recv_pktlen), chan = attr_size(chan_obj, s_recv_chan);
    Py_ssize_t window = attr_size(chan_obj, s_recv_window), low_window = attr_size(chan_obj, s_init_recv_window);
    if (PyErr_Occurred() || !(enc = PyObject_GetAttr(conn, s_recv_encryption))
            || !(cipher = PyObject_GetAttr(enc, s_cipher)) || !(iv_in = PyObject_GetAttr(cipher, s_iv))
            || keys_of(cipher, enc, &key, &aead) < 0)
        goto done;
    low_window = (low_window + 1) / 2;
    if (!PyBytes_Check(iv_in) || PyBytes_GET_SIZE(iv_in) != 12 || start < 0 || end > in_len || start > end
            || max_pktlen < 0 || chan < 0 || chan > 0xFFFFFFFFLL || window < 0 || (key == Py_None && aead == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "open_batch: bad arguments");
        goto done;
    }
    memcpy(iv, PyBytes_AS_STRING(iv_in), 12);
    Py_ssize_t pos = start;
    while (end - pos >= 4 + SSH_TAG) {
        Py_ssize_t pktlen = get_u32(in + pos);
        if (pktlen > max_pktlen || pktlen > plain->len) {
            o->stopped = 1; /* the caller's own path refuses it, or decrypts it into a bigger buffer */
            break;
        }
        if (pktlen > end - pos - 4 - SSH_TAG)
            break;
        if (aead_into(s_decrypt_into, key, aead, iv, in + pos + 4, pktlen + SSH_TAG, in + pos, plain->buf, pktlen) < 0)
            goto done;
        next_nonce(iv);
        decrypted = 1;
        pos += 4 + pktlen + SSH_TAG;
        const uint8_t *p = plain->buf;
        Py_ssize_t padlen = pktlen > 0 ? p[0] : 0;
        int fast = pktlen >= DATA_HEAD + FRAME_HEADER && p[1] == MSG_CHANNEL_DATA && get_u32(p + 2) == (uint32_t)chan;
        Py_ssize_t data = fast ? get_u32(p + 6) : 0;
        fast = fast && DATA_HEAD + data == pktlen - padlen && window - consumed - data >= low_window;
        const uint8_t *frame = p + DATA_HEAD;
        fast = fast && get_u32(frame) + FRAME_HEADER == (uint64_t)data && get_u32(frame) <= MAX_BODY
               && frame[4] == kind;
        if (!fast) {
            o->stopped = 2;
            o->stopped_len = pktlen;
            break;
        }
        o->messages++;
        consumed += data;
        Py_ssize_t n = write_body(fd, frame + FRAME_HEADER, data - FRAME_HEADER, check, drops, &size);
        if (n < 0)
            drops[OK]++; /* slot 0 is free: the bodies refused whole */
        else
            packets += n;
    }
    o->pos = pos;
    if (decrypted) {
        PyObject *next = PyBytes_FromStringAndSize((const char *)iv, 12);
        int r = next ? PyObject_SetAttr(cipher, s_iv, next) : -1;
        Py_XDECREF(next);
        if (r < 0)
            goto done;
    }
    if (o->messages) {
        PyObject *seq = PyObject_GetAttr(conn, s_recv_seq);
        unsigned long next = seq ? (PyLong_AsUnsignedLongMask(seq) + (unsigned long)o->messages) & 0xFFFFFFFFul : 0;
        Py_XDECREF(seq);
        PyObject *next_seq = seq && !PyErr_Occurred() ? PyLong_FromUnsignedLong(next) : NULL;
        int ok = next_seq && PyObject_SetAttr(conn, s_recv_seq, next_seq) == 0;
        Py_XDECREF(next_seq);
        if (!ok || set_size(chan_obj, s_recv_window, window - consumed) < 0 || count(counters, s_packets_in, packets) < 0
                || count(counters, s_bytes_in, size) < 0 || count(counters, s_malformed_frames, drops[OK]) < 0
                || count_drops(counters, drops, check) < 0)
            goto done;
    }
    result = 0;
done:
    Py_XDECREF(enc);
    Py_XDECREF(cipher);
    Py_XDECREF(key);
    Py_XDECREF(aead);
    Py_XDECREF(iv_in);
    return result;
}

/* open_batch(src, start, end, plain, conn, chan, kind, fd, check, counters)
 *   -> (pos, messages, stopped, stopped_len)
 * Every whole SSH packet in src[start:end]: decrypted into `plain` with the connection's AES-GCM
 * object; while each is CHANNEL_DATA to `chan`, leaves its window at least half open, and is
 * exactly one frame of `kind`, its packets go to the TUN (`messages` of them). `stopped`: 0 at a
 * packet not wholly received yet (pos at its start), 1 at one the caller's own path must take
 * (too long, or longer than `plain`; pos at its start, not decrypted), 2 after a packet that is
 * something else (pos after it, its plaintext in plain[:stopped_len], its sequence number not
 * counted). Then, as sshfast's Python would: the cipher's nonce, the connection's sequence
 * number and the channel's window advanced, and the pump's counters (packets_in, bytes_in, the
 * drops, dropped_frames_malformed for a body refused whole). */
static PyObject *open_batch(PyObject *self, PyObject *args) {
    Py_buffer src, plain;
    Py_ssize_t start, end;
    PyObject *conn, *chan_obj, *spec, *counters;
    int kind, fd;
    check_t check;
    if (!PyArg_ParseTuple(args, "y*nnw*OOiiOO!", &src, &start, &end, &plain, &conn, &chan_obj, &kind, &fd, &spec,
                          &PyDict_Type, &counters))
        return NULL;
    PyObject *result = NULL;
    opened_t o;
    if (parse_check(spec, &check) == 0) {
        if (open_packets(src.buf, src.len, start, end, &plain, conn, chan_obj, kind, fd, &check, counters, &o) == 0)
            result = Py_BuildValue("nnin", o.pos, o.messages, o.stopped, o.stopped_len);
        release_check(&check);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&plain);
    return result;
}

/* sshfast.Receiver's state that received() reads: the receiver's, its _Input's, its _NativeInput's
 * and asyncssh's (the round trips of tests/test_sshfast.py fail if any is renamed). */
static PyObject *s_input, *s_start, *s_end, *s_plain, *s_native, *s_found, *s_alive, *s_inpbuf, *s_recv_handler,
    *s_boundary, *s_decompressor, *s_channels, *s_recv_state, *s_recv_paused, *s_encoding, *s_session,
    *s_takes_memoryview, *s_fd, *s_counters, *s_handle, *s_give_back, *s_fail, *s_whole, *s_room, *s_buf;

/* Receiver._ours(): between two packets, nothing in asyncssh's buffer, AES-GCM, no compression. */
static int ours(PyObject *receiver, PyObject *conn) {
    int t;
    if ((t = attr_true(conn, s_inpbuf)) != 0 || (t = attr_true(conn, s_auth_complete)) != 1
            || (t = attr_true(conn, s_decompressor)) != 0)
        return t < 0 ? -1 : 0;
    PyObject *enc = PyObject_GetAttr(conn, s_recv_encryption);
    if (!enc)
        return -1;
    t = Py_TYPE(enc) == (PyTypeObject *)gcm_type;
    Py_DECREF(enc);
    PyObject *handler = t ? PyObject_GetAttr(conn, s_recv_handler) : NULL;
    PyObject *boundary = handler ? PyObject_GetAttr(receiver, s_boundary) : NULL;
    if (t && !boundary)
        t = -1;
    else if (t)
        t = PyObject_RichCompareBool(handler, boundary, Py_EQ);
    Py_XDECREF(handler);
    Py_XDECREF(boundary);
    return t;
}

/* 1 if getattr(obj, name) == text (a str), 0 if not, -1 on an error. */
static int attr_is(PyObject *obj, PyObject *name, PyObject *text) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v)
        return -1;
    int r = PyUnicode_Check(v) && PyUnicode_Compare(v, text) == 0;
    Py_DECREF(v);
    return r;
}

/* The sink _NativeInput.sink() would return, when it is the one it found last time and still
 * holds (the same checks): a new reference to its (chan, kind, pump, fd, check); None when the
 * Python must look (nothing found yet, something changed); NULL on an error. */
static PyObject *cached_sink(PyObject *receiver, PyObject *conn) {
    PyObject *native = PyObject_GetAttr(receiver, s_native);
    PyObject *found = native && native != Py_None ? PyObject_GetAttr(native, s_found) : NULL;
    Py_XDECREF(native);
    if (!found)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 5) {
        Py_DECREF(found);
        return Py_NewRef(Py_None);
    }
    PyObject *chan = PyTuple_GET_ITEM(found, 0), *channels = NULL, *id = NULL, *session = NULL;
    int t = (channels = PyObject_GetAttr(conn, s_channels)) && (id = PyObject_GetAttr(chan, s_recv_chan)) ? 1 : -1;
    if (t > 0) {
        PyObject *current = PyDict_Check(channels) ? PyDict_GetItemWithError(channels, id) : NULL;
        t = PyErr_Occurred() ? -1 : current == chan;
    }
    if (t > 0 && (t = attr_is(chan, s_recv_state, s_open)) > 0 && (t = attr_is(chan, s_send_state, s_open)) > 0
            && (t = attr_true(chan, s_recv_paused)) == 0 && (t = attr_true(chan, s_encoding)) == 0)
        t = (session = PyObject_GetAttr(chan, s_session)) ? attr_true(session, s_takes_memoryview) : -1;
    if (t > 0) { /* the pump still has that TUN (a stopped pump has none) */
        Py_ssize_t fd = attr_size(PyTuple_GET_ITEM(found, 2), s_fd);
        t = PyErr_Occurred() ? -1 : PyLong_Check(PyTuple_GET_ITEM(found, 3))
                                        && fd == PyLong_AsSsize_t(PyTuple_GET_ITEM(found, 3));
    }
    Py_XDECREF(channels);
    Py_XDECREF(id);
    Py_XDECREF(session);
    if (t < 0) {
        PyErr_Clear(); /* an attribute missing: the Python's own look decides */
        Py_DECREF(found);
        return Py_NewRef(Py_None);
    }
    if (!t)
        Py_SETREF(found, Py_NewRef(Py_None));
    return found;
}

/* The monotonic clock, as time.monotonic() reads it. */
static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + now.tv_nsec * 1e-9;
}

/* received(receiver, nbytes): sshfast._ReadInto.buffer_updated for the event loop itself, in C for
 * the usual read (the connection ours, the tunnel's sink as found last time, no keepalive due):
 * open_packets over what is in the receiver's _Input, which then starts after what it used; the
 * rest as the Python does it: a packet it left (stopped 1 or 2) with Receiver._handle, the read
 * asyncssh must see with Receiver._give_back, a failure with Receiver._fail. */
static PyObject *received(PyObject *self, PyObject *args) {
    PyObject *receiver;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(args, "On", &receiver, &nbytes))
        return NULL;
    PyObject *inp = NULL, *conn = NULL, *sink = NULL, *buf = NULL, *plain_obj = NULL, *counters = NULL,
             *result = NULL;
    Py_buffer src = {0}, plain = {0};
    if (!(inp = PyObject_GetAttr(receiver, s_input)) || !(conn = PyObject_GetAttr(receiver, s_conn)))
        goto done;
    Py_ssize_t start = attr_size(inp, s_start), end = attr_size(inp, s_end);
    if (PyErr_Occurred() || start < 0 || end < start || nbytes < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "received: bad input state");
        goto done;
    }
    Py_ssize_t had = end - start;
    end += nbytes;
    if (set_size(inp, s_end, end) < 0)
        goto done;
    int t = had ? 1 : ours(receiver, conn);
    if (t <= 0) {
        result = t < 0 ? NULL : PyObject_CallMethodNoArgs(receiver, s_give_back);
        goto done;
    }
    PyObject *alive = PyObject_GetAttr(receiver, s_alive);
    double last = alive ? PyFloat_AsDouble(alive) : -1.0;
    Py_XDECREF(alive);
    if (PyErr_Occurred() || !(sink = cached_sink(receiver, conn)))
        goto done;
    if (sink == Py_None || monotonic() - last >= keepalive_reset) {
        result = PyObject_CallMethodNoArgs(receiver, s_handle);
        goto done;
    }
    PyObject *chan = PyTuple_GET_ITEM(sink, 0), *pump = PyTuple_GET_ITEM(sink, 2);
    int kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(sink, 1)), fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(sink, 3));
    check_t check;
    if (PyErr_Occurred() || !(counters = PyObject_GetAttr(pump, s_counters)) || !PyDict_Check(counters)
            || !(buf = PyObject_GetAttr(inp, s_buf)) || !(plain_obj = PyObject_GetAttr(receiver, s_plain))
            || PyObject_GetBuffer(buf, &src, PyBUF_SIMPLE) < 0 || PyObject_GetBuffer(plain_obj, &plain, PyBUF_WRITABLE) < 0
            || parse_check(PyTuple_GET_ITEM(sink, 4), &check) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "received: the pump's counters are not a dict");
        goto done;
    }
    opened_t o;
    int failed = open_packets(src.buf, src.len, start, end, &plain, conn, chan, kind, fd, &check, counters, &o) < 0;
    release_check(&check);
    if (failed) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb); /* PyErr_GetRaisedException from Python 3.12 on */
        PyErr_NormalizeException(&type, &exc, &tb);
        if (exc && tb)
            PyException_SetTraceback(exc, tb);
        result = exc ? PyObject_CallMethodOneArg(receiver, s_fail, exc) : NULL;
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        goto done;
    }
    /* All used (the usual case): the next read goes to the front. Not after a packet left to the
     * Python: Receiver._handle reads its ciphertext just before the input's start. */
    int all_used = !o.stopped && o.pos == end;
    if (set_size(inp, s_start, all_used ? 0 : o.pos) < 0 || (all_used && set_size(inp, s_end, 0) < 0))
        goto done;
    if (!o.stopped) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *pending = PyLong_FromSsize_t(o.stopped == 2 ? o.stopped_len : 0);
        result = pending ? PyObject_CallMethodOneArg(receiver, s_handle, pending) : NULL;
        Py_XDECREF(pending);
    }
done:
    if (src.obj)
        PyBuffer_Release(&src);
    if (plain.obj)
        PyBuffer_Release(&plain);
    Py_XDECREF(inp);
    Py_XDECREF(conn);
    Py_XDECREF(sink);
    Py_XDECREF(buf);
    Py_XDECREF(plain_obj);
    Py_XDECREF(counters);
    return result;
}

/* get_buffer(receiver, size, sizehint): _ReadInto.get_buffer for the event loop itself: the whole
 * of an empty _Input (the usual case), else its room(size) in Python. */
static PyObject *get_buffer(PyObject *self, PyObject *args) {
    PyObject *receiver, *hint;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "OnO", &receiver, &size, &hint))
        return NULL;
    PyObject *inp = PyObject_GetAttr(receiver, s_input), *buf = NULL, *result = NULL;
    if (!inp)
        return NULL;
    Py_ssize_t end = attr_size(inp, s_end);
    if (!PyErr_Occurred() && end == 0 && (buf = PyObject_GetAttr(inp, s_buf)) && PyByteArray_Check(buf)
            && PyByteArray_GET_SIZE(buf) >= size) {
        result = PyObject_GetAttr(inp, s_whole);
    } else if (!PyErr_Occurred()) {
        PyObject *n = PyLong_FromSsize_t(size);
        result = n ? PyObject_CallMethodOneArg(inp, s_room, n) : NULL;
        Py_XDECREF(n);
    }
    Py_XDECREF(buf);
    Py_DECREF(inp);
    return result;
}

/* libcrypto() -> bool: whether packets are sealed and opened by libcrypto (_gcm.c), for the logs. */
static PyObject *libcrypto(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(gcm_available());
}

static PyMethodDef methods[] = {
    {"pump_out", pump_out, METH_VARARGS, "A TUN's wake-up: read its packets, frame them and send the frame."},
    {"tun_write_batch", tun_write_batch, METH_VARARGS, "Check and write a PACKETS body's packets to a TUN."},
    {"open_batch", open_batch, METH_VARARGS, "Decrypt SSH packets and deliver the tunnel's channel data."},
    {"received", received, METH_VARARGS, "sshfast's buffer_updated: open_batch over what the socket brought."},
    {"get_buffer", get_buffer, METH_VARARGS, "sshfast's get_buffer: where the socket's next read goes."},
    {"send_data", send_data, METH_VARARGS, "Send a frame built in place as one SSH channel data message."},
    {"libcrypto", libcrypto, METH_NOARGS, "Whether AES-GCM goes through libcrypto directly (_gcm.c)."},
    {"bind", bind, METH_VARARGS, "Give the C asyncssh's GCMEncryption, sshfast._aead, the largest packet and more."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_datapath", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__datapath(void) {
    struct { PyObject **name; const char *text; } names[] = {
        {&s_decrypt_into, "decrypt_into"}, {&s_encrypt_into, "encrypt_into"}, {&s_conn, "_conn"},
        {&s_send_encryption, "_send_encryption"}, {&s_cipher, "_cipher"}, {&s_mrd_aead, "_mrd_aead"},
        {&s_compressor, "_compressor"}, {&s_kex_complete, "_kex_complete"}, {&s_auth_complete, "_auth_complete"},
        {&s_send_state, "_send_state"}, {&s_send_buf, "_send_buf"}, {&s_send_window, "_send_window"},
        {&s_send_pktsize, "_send_pktsize"}, {&s_transport, "_transport"}, {&s_rekey_bytes_sent, "_rekey_bytes_sent"},
        {&s_rekey_bytes, "_rekey_bytes"}, {&s_rekey_seconds, "_rekey_seconds"}, {&s_rekey_time, "_rekey_time"},
        {&s_send_blocksize, "_send_blocksize"}, {&s_send_enchdrlen, "_send_enchdrlen"}, {&s_mrd_out, "_mrd_out"},
        {&s_iv, "_iv"}, {&s_send_seq, "_send_seq"}, {&s_send_chan, "_send_chan"}, {&s_write, "write"},
        {&s_get_write_buffer_size, "get_write_buffer_size"}, {&s_open, "open"},
        {&s_recv_encryption, "_recv_encryption"}, {&s_max_recv_pktlen, "_max_recv_pktlen"},
        {&s_recv_seq, "_recv_seq"}, {&s_recv_chan, "_recv_chan"}, {&s_recv_window, "_recv_window"},
        {&s_init_recv_window, "_init_recv_window"}, {&s_packets_in, "packets_in"}, {&s_bytes_in, "bytes_in"},
        {&s_malformed_frames, "dropped_frames_malformed"}, {&s_chan, "chan"}, {&s_packets_out, "packets_out"},
        {&s_bytes_out, "bytes_out"}, {&s_frames_out, "frames_out"}, {&s_input, "_input"}, {&s_start, "start"},
        {&s_end, "end"}, {&s_plain, "_plain"}, {&s_native, "_native"}, {&s_found, "_found"}, {&s_alive, "_alive"},
        {&s_inpbuf, "_inpbuf"}, {&s_recv_handler, "_recv_handler"}, {&s_boundary, "_boundary"},
        {&s_decompressor, "_decompressor"}, {&s_channels, "_channels"}, {&s_recv_state, "_recv_state"},
        {&s_recv_paused, "_recv_paused"}, {&s_encoding, "_encoding"}, {&s_session, "_session"},
        {&s_takes_memoryview, "takes_memoryview"}, {&s_fd, "fd"}, {&s_counters, "counters"}, {&s_handle, "_handle"},
        {&s_give_back, "_give_back"}, {&s_fail, "_fail"}, {&s_whole, "_whole"}, {&s_room, "room"}, {&s_buf, "buf"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!(*names[i].name = PyUnicode_InternFromString(names[i].text)))
            return NULL;
    for (int r = 1; r < N_REASONS; r++)
        if (REASONS[r] && !(reason_names[r] = PyUnicode_InternFromString(REASONS[r])))
            return NULL;
    if (gcm_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
#ifdef DATAPATH_SOURCE_SHA256 /* setup.py: native.py uses no extension built from another source */
    if (m && PyModule_AddStringConstant(m, "SOURCE_SHA256", DATAPATH_SOURCE_SHA256) < 0)
        Py_CLEAR(m);
#endif
    return m;
}
