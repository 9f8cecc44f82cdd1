/* AES-GCM for the packet path (_datapath.c), straight through the system's libcrypto.
 *
 * cryptography's AESGCM.encrypt_into, which the packet path used for every SSH packet, costs
 * ~1.5 us a call hot and several times that right after a wake-up: three memoryviews, a method
 * call, pyo3's argument parsing, a copy of the keyed context and its cleansing, per packet.
 * Here each key is set up once (one EVP_CIPHER_CTX per direction) and a packet costs a new IV
 * and three EVP calls. libcrypto.so.3 is Python's own (its _ssl and _hashlib link it, so Debian's
 * python3 always brings it), opened with dlopen: no OpenSSL headers are needed to build, and where
 * it is missing the packet path goes on with cryptography's object, as before. Nothing else of
 * OpenSSL is used: keys, key exchange and every other message stay asyncssh's and cryptography's.
 */
#include "_gcm.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#define TAG 16
#define CTRL_GCM_GET_TAG 0x10 /* EVP_CTRL_GCM_GET_TAG, EVP_CTRL_GCM_SET_TAG: OpenSSL's ABI */
#define CTRL_GCM_SET_TAG 0x11

typedef struct ctx_st CTX; /* EVP_CIPHER_CTX, EVP_CIPHER: opaque */
typedef struct cipher_st CIPHER;

static struct {
    CTX *(*ctx_new)(void);
    void (*ctx_free)(CTX *);
    const CIPHER *(*aes_128_gcm)(void);
    const CIPHER *(*aes_256_gcm)(void);
    int (*init)(CTX *, const CIPHER *, void *engine, const uint8_t *key, const uint8_t *iv, int enc);
    int (*update)(CTX *, uint8_t *out, int *outl, const uint8_t *in, int inl);
    int (*final)(CTX *, uint8_t *out, int *outl);
    int (*ctrl)(CTX *, int type, int arg, void *ptr);
} ssl;
static int loaded; /* 0: not tried yet; 1: every function found; -1: not there */

static int load(void) {
    if (loaded)
        return loaded;
    loaded = -1;
    const char *off = getenv("MIRRORD_NS_LIBCRYPTO"); /* "0": cryptography's object only (A/B runs, debugging) */
    if (off && !strcmp(off, "0"))
        return loaded;
    void *lib = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD); /* already in: _hashlib's */
    if (!lib && !(lib = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL)))
        return loaded;
    struct { void **fn; const char *name; } fns[] = {
        {(void **)&ssl.ctx_new, "EVP_CIPHER_CTX_new"}, {(void **)&ssl.ctx_free, "EVP_CIPHER_CTX_free"},
        {(void **)&ssl.aes_128_gcm, "EVP_aes_128_gcm"}, {(void **)&ssl.aes_256_gcm, "EVP_aes_256_gcm"},
        {(void **)&ssl.init, "EVP_CipherInit_ex"}, {(void **)&ssl.update, "EVP_CipherUpdate"},
        {(void **)&ssl.final, "EVP_CipherFinal_ex"}, {(void **)&ssl.ctrl, "EVP_CIPHER_CTX_ctrl"},
    };
    for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++)
        if (!(*fns[i].fn = dlsym(lib, fns[i].name)))
            return loaded; /* the handle stays open: harmless, and libcrypto is Python's anyway */
    loaded = 1;
    return loaded;
}

int gcm_available(void) {
    return load() > 0;
}

typedef struct {
    CTX *seal, *open; /* each made on its first use: a cipher object serves one direction */
    const CIPHER *cipher;
    uint8_t key[32];
} gcm_key_t;

static const char CAPSULE[] = "mirrord_tun._gcm.key";
static PyObject *s_key, *s_mrd_gcm, *invalid_tag;

static void key_free(PyObject *capsule) {
    gcm_key_t *k = PyCapsule_GetPointer(capsule, CAPSULE);
    if (!k)
        return;
    if (k->seal)
        ssl.ctx_free(k->seal);
    if (k->open)
        ssl.ctx_free(k->open);
    explicit_bzero(k->key, sizeof(k->key));
    PyMem_Free(k);
}

static PyObject *make_key(PyObject *cipher) {
    PyObject *raw = PyObject_GetAttr(cipher, s_key);
    if (!raw)
        return NULL;
    Py_ssize_t n = PyBytes_Check(raw) ? PyBytes_GET_SIZE(raw) : 0;
    if ((n != 16 && n != 32) || load() < 0) {
        Py_DECREF(raw);
        Py_RETURN_NONE;
    }
    gcm_key_t *k = PyMem_Calloc(1, sizeof(*k));
    if (!k) {
        Py_DECREF(raw);
        return PyErr_NoMemory();
    }
    k->cipher = n == 16 ? ssl.aes_128_gcm() : ssl.aes_256_gcm();
    memcpy(k->key, PyBytes_AS_STRING(raw), (size_t)n);
    Py_DECREF(raw);
    PyObject *capsule = PyCapsule_New(k, CAPSULE, key_free);
    if (!capsule) {
        explicit_bzero(k->key, sizeof(k->key));
        PyMem_Free(k);
    }
    return capsule;
}

int gcm_init(void) {
    s_key = PyUnicode_InternFromString("_key");
    s_mrd_gcm = s_key ? PyUnicode_InternFromString("_mrd_gcm") : NULL;
    return s_mrd_gcm ? 0 : -1;
}

PyObject *gcm_key_of(PyObject *cipher) {
    PyObject *key = PyObject_GetAttr(cipher, s_mrd_gcm);
    if (key || !PyErr_ExceptionMatches(PyExc_AttributeError))
        return key;
    PyErr_Clear(); /* the first packet with this key */
    if ((key = make_key(cipher)) && PyObject_SetAttr(cipher, s_mrd_gcm, key) < 0)
        Py_CLEAR(key);
    return key;
}

/* The direction's context, keyed on its first use, with the packet's IV set. */
static CTX *ready(gcm_key_t *k, int seal, const uint8_t *iv) {
    CTX **ctx = seal ? &k->seal : &k->open;
    if (!*ctx) {
        if (!(*ctx = ssl.ctx_new()))
            return NULL;
        if (ssl.init(*ctx, k->cipher, NULL, k->key, NULL, seal) != 1) {
            ssl.ctx_free(*ctx);
            return *ctx = NULL;
        }
    }
    return ssl.init(*ctx, NULL, NULL, NULL, iv, -1) == 1 ? *ctx : NULL;
}

static int failed(const char *what) {
    PyErr_Format(PyExc_RuntimeError, "libcrypto's AES-GCM failed to %s a packet", what);
    return -1;
}

/* The context for one packet of `key` in one direction: its IV set and its 4 bytes of AAD fed;
 * NULL with an exception. */
static CTX *begin(PyObject *key, int seal, const uint8_t *iv, const uint8_t *aad) {
    gcm_key_t *k = PyCapsule_GetPointer(key, CAPSULE);
    if (!k)
        return NULL;
    CTX *ctx = ready(k, seal, iv);
    int n;
    if (!ctx || ssl.update(ctx, NULL, &n, aad, 4) != 1) {
        failed(seal ? "seal" : "open");
        return NULL;
    }
    return ctx;
}

int gcm_seal(PyObject *key, const uint8_t *iv, const uint8_t *aad, const uint8_t *in, Py_ssize_t len, uint8_t *out) {
    CTX *ctx = len <= INT32_MAX - TAG ? begin(key, 1, iv, aad) : NULL;
    int n;
    if (!ctx)
        return PyErr_Occurred() ? -1 : failed("seal");
    if (ssl.update(ctx, out, &n, in, (int)len) != 1 || ssl.final(ctx, out + n, &n) != 1
            || ssl.ctrl(ctx, CTRL_GCM_GET_TAG, TAG, out + len) != 1)
        return failed("seal");
    return 0;
}

int gcm_open(PyObject *key, const uint8_t *iv, const uint8_t *aad, const uint8_t *in, Py_ssize_t len, uint8_t *out) {
    CTX *ctx = len >= TAG && len <= INT32_MAX ? begin(key, 0, iv, aad) : NULL;
    int n;
    if (!ctx)
        return PyErr_Occurred() ? -1 : failed("open");
    if (ssl.update(ctx, out, &n, in, (int)(len - TAG)) != 1
            || ssl.ctrl(ctx, CTRL_GCM_SET_TAG, TAG, (void *)(in + len - TAG)) != 1)
        return failed("open");
    if (ssl.final(ctx, out + n, &n) == 1)
        return 0;
    memset(out, 0, (size_t)(len - TAG)); /* nothing unauthenticated is left behind */
    if (!invalid_tag) {
        PyObject *m = PyImport_ImportModule("cryptography.exceptions");
        invalid_tag = m ? PyObject_GetAttrString(m, "InvalidTag") : NULL;
        Py_XDECREF(m);
        if (!invalid_tag)
            return -1;
    }
    PyErr_SetNone(invalid_tag);
    return -1;
}
