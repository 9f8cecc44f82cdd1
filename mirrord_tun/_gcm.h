/* AES-GCM for one SSH packet at a time, straight through the system's libcrypto (_gcm.c). */
#ifndef MIRRORD_GCM_H
#define MIRRORD_GCM_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* The attribute names below, interned once: 0, or -1 with an exception (the module's init). */
int gcm_init(void);

/* The key of asyncssh's cipher object `cipher` (its _key), set up once and kept on it as _mrd_gcm:
 * a new reference to a capsule, or to None where libcrypto is not there or the key is not one of
 * AES-GCM's (the caller then uses cryptography's object); NULL with an exception on an error. */
PyObject *gcm_key_of(PyObject *cipher);

/* Whether libcrypto's AES-GCM is there to use (opened on the first call). */
int gcm_available(void);

/* out[:len + 16] = the encryption of in[:len] under `iv`, with 4 bytes of `aad`, then the tag. 0, or
 * -1 with an exception. `key` is what gcm_key_of gave (not None). */
int gcm_seal(PyObject *key, const uint8_t *iv, const uint8_t *aad, const uint8_t *in, Py_ssize_t len, uint8_t *out);

/* out[:len - 16] = the decryption of in[:len] (the tag last); -1 with cryptography's InvalidTag when
 * it does not authenticate (the caller ends the connection, as it does for cryptography's). */
int gcm_open(PyObject *key, const uint8_t *iv, const uint8_t *aad, const uint8_t *in, Py_ssize_t len, uint8_t *out);

#endif
