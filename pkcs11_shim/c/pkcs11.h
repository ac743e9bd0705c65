/*
 * pkcs11.h - the PKCS#11 v2.40 interface, the PKCS#11 3.0 interface discovery
 * (CK_INTERFACE, CK_FUNCTION_LIST_3_0, C_GetInterfaceList, C_GetInterface), the PKCS#11 3.2
 * post-quantum constants listed in DESIGN §8 and pqhsm's vendor-defined values, as used
 * by libpqhsm-pkcs11.so.  Written for this project from
 * the OASIS specification's constant tables; Linux layout: CK_ULONG is unsigned long,
 * structures use the platform's natural alignment (no packing pragma).
 */
#ifndef PQHSM_PKCS11_H
#define PQHSM_PKCS11_H

#ifdef __cplusplus
extern "C" {
#endif

#define CK_PTR *
#define NULL_PTR ((void *)0)

typedef unsigned char CK_BYTE;
typedef CK_BYTE CK_CHAR;
typedef CK_BYTE CK_UTF8CHAR;
typedef CK_BYTE CK_BBOOL;
typedef unsigned long CK_ULONG;
typedef long CK_LONG;
typedef CK_ULONG CK_FLAGS;

typedef CK_BYTE CK_PTR CK_BYTE_PTR;
typedef CK_CHAR CK_PTR CK_CHAR_PTR;
typedef CK_UTF8CHAR CK_PTR CK_UTF8CHAR_PTR;
typedef CK_ULONG CK_PTR CK_ULONG_PTR;
typedef void CK_PTR CK_VOID_PTR;
typedef CK_VOID_PTR CK_PTR CK_VOID_PTR_PTR;

#define CK_TRUE 1
#define CK_FALSE 0
#define CK_UNAVAILABLE_INFORMATION (~0UL)
#define CK_EFFECTIVELY_INFINITE 0UL

typedef struct CK_VERSION {
    CK_BYTE major;
    CK_BYTE minor;
} CK_VERSION;
typedef CK_VERSION CK_PTR CK_VERSION_PTR;

typedef struct CK_INFO {
    CK_VERSION cryptokiVersion;
    CK_UTF8CHAR manufacturerID[32];
    CK_FLAGS flags;
    CK_UTF8CHAR libraryDescription[32];
    CK_VERSION libraryVersion;
} CK_INFO;
typedef CK_INFO CK_PTR CK_INFO_PTR;

typedef CK_ULONG CK_NOTIFICATION;
#define CKN_SURRENDER 0UL

typedef CK_ULONG CK_SLOT_ID;
typedef CK_SLOT_ID CK_PTR CK_SLOT_ID_PTR;

typedef struct CK_SLOT_INFO {
    CK_UTF8CHAR slotDescription[64];
    CK_UTF8CHAR manufacturerID[32];
    CK_FLAGS flags;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
} CK_SLOT_INFO;
typedef CK_SLOT_INFO CK_PTR CK_SLOT_INFO_PTR;

#define CKF_TOKEN_PRESENT 0x00000001UL
#define CKF_REMOVABLE_DEVICE 0x00000002UL
#define CKF_HW_SLOT 0x00000004UL

typedef struct CK_TOKEN_INFO {
    CK_UTF8CHAR label[32];
    CK_UTF8CHAR manufacturerID[32];
    CK_UTF8CHAR model[16];
    CK_CHAR serialNumber[16];
    CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount;
    CK_ULONG ulSessionCount;
    CK_ULONG ulMaxRwSessionCount;
    CK_ULONG ulRwSessionCount;
    CK_ULONG ulMaxPinLen;
    CK_ULONG ulMinPinLen;
    CK_ULONG ulTotalPublicMemory;
    CK_ULONG ulFreePublicMemory;
    CK_ULONG ulTotalPrivateMemory;
    CK_ULONG ulFreePrivateMemory;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
    CK_CHAR utcTime[16];
} CK_TOKEN_INFO;
typedef CK_TOKEN_INFO CK_PTR CK_TOKEN_INFO_PTR;

#define CKF_RNG 0x00000001UL
#define CKF_WRITE_PROTECTED 0x00000002UL
#define CKF_LOGIN_REQUIRED 0x00000004UL
#define CKF_USER_PIN_INITIALIZED 0x00000008UL
#define CKF_TOKEN_INITIALIZED 0x00000400UL
#define CKF_USER_PIN_LOCKED 0x00040000UL

typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_SESSION_HANDLE CK_PTR CK_SESSION_HANDLE_PTR;
#define CK_INVALID_HANDLE 0UL

typedef CK_ULONG CK_USER_TYPE;
#define CKU_SO 0UL
#define CKU_USER 1UL
#define CKU_CONTEXT_SPECIFIC 2UL

typedef CK_ULONG CK_STATE;
#define CKS_RO_PUBLIC_SESSION 0UL
#define CKS_RO_USER_FUNCTIONS 1UL
#define CKS_RW_PUBLIC_SESSION 2UL
#define CKS_RW_USER_FUNCTIONS 3UL
#define CKS_RW_SO_FUNCTIONS 4UL

typedef struct CK_SESSION_INFO {
    CK_SLOT_ID slotID;
    CK_STATE state;
    CK_FLAGS flags;
    CK_ULONG ulDeviceError;
} CK_SESSION_INFO;
typedef CK_SESSION_INFO CK_PTR CK_SESSION_INFO_PTR;

#define CKF_RW_SESSION 0x00000002UL
#define CKF_SERIAL_SESSION 0x00000004UL

typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_OBJECT_HANDLE CK_PTR CK_OBJECT_HANDLE_PTR;

typedef CK_ULONG CK_OBJECT_CLASS;
typedef CK_OBJECT_CLASS CK_PTR CK_OBJECT_CLASS_PTR;
#define CKO_DATA 0x0UL
#define CKO_CERTIFICATE 0x1UL
#define CKO_PUBLIC_KEY 0x2UL
#define CKO_PRIVATE_KEY 0x3UL
#define CKO_SECRET_KEY 0x4UL
#define CKO_VENDOR_DEFINED 0x80000000UL

typedef CK_ULONG CK_KEY_TYPE;
#define CKK_RSA 0x00UL
#define CKK_EC 0x03UL
#define CKK_EC_EDWARDS 0x40UL
#define CKK_ML_KEM 0x49UL
#define CKK_ML_DSA 0x4aUL
#define CKK_SLH_DSA 0x4bUL
#define CKK_VENDOR_DEFINED 0x80000000UL

typedef CK_ULONG CK_ATTRIBUTE_TYPE;
#define CKF_ARRAY_ATTRIBUTE 0x40000000UL
#define CKA_CLASS 0x000UL
#define CKA_TOKEN 0x001UL
#define CKA_PRIVATE 0x002UL
#define CKA_LABEL 0x003UL
#define CKA_VALUE 0x011UL
#define CKA_KEY_TYPE 0x100UL
#define CKA_ID 0x102UL
#define CKA_SENSITIVE 0x103UL
#define CKA_SIGN 0x108UL
#define CKA_VERIFY 0x10aUL
#define CKA_START_DATE 0x110UL
#define CKA_END_DATE 0x111UL
#define CKA_EC_PARAMS 0x180UL
#define CKA_EC_POINT 0x181UL
#define CKA_WRAP_TEMPLATE (CKF_ARRAY_ATTRIBUTE | 0x211UL)
#define CKA_UNWRAP_TEMPLATE (CKF_ARRAY_ATTRIBUTE | 0x212UL)
#define CKA_DERIVE_TEMPLATE (CKF_ARRAY_ATTRIBUTE | 0x213UL)
#define CKA_PUBLIC_KEY_INFO 0x129UL
#define CKA_ALLOWED_MECHANISMS (CKF_ARRAY_ATTRIBUTE | 0x600UL)
#define CKA_PARAMETER_SET 0x61dUL
#define CKA_ENCAPSULATE 0x633UL
#define CKA_DECAPSULATE 0x634UL
#define CKA_SEED 0x637UL
#define CKA_VENDOR_DEFINED 0x80000000UL

typedef struct CK_ATTRIBUTE {
    CK_ATTRIBUTE_TYPE type;
    CK_VOID_PTR pValue;
    CK_ULONG ulValueLen;
} CK_ATTRIBUTE;
typedef CK_ATTRIBUTE CK_PTR CK_ATTRIBUTE_PTR;

typedef struct CK_DATE {
    CK_CHAR year[4];
    CK_CHAR month[2];
    CK_CHAR day[2];
} CK_DATE;

typedef CK_ULONG CK_MECHANISM_TYPE;
typedef CK_MECHANISM_TYPE CK_PTR CK_MECHANISM_TYPE_PTR;
#define CKM_RSA_PKCS 0x0001UL
#define CKM_RSA_PKCS_OAEP 0x0009UL
#define CKM_RSA_PKCS_PSS 0x000dUL
#define CKM_ML_KEM_KEY_PAIR_GEN 0x000fUL
#define CKM_ML_KEM 0x0017UL
#define CKM_ML_DSA_KEY_PAIR_GEN 0x001cUL
#define CKM_ML_DSA 0x001dUL
#define CKM_HASH_ML_DSA 0x001fUL
#define CKM_SHA256 0x0250UL
#define CKM_EC_KEY_PAIR_GEN 0x1040UL
#define CKM_ECDSA 0x1041UL
#define CKM_ECDSA_SHA1 0x1042UL
#define CKM_ECDSA_SHA224 0x1043UL
#define CKM_ECDSA_SHA256 0x1044UL
#define CKM_ECDSA_SHA384 0x1045UL
#define CKM_ECDSA_SHA512 0x1046UL
/* RFC 8032 EdDSA variants (PKCS#11 3.0). */
typedef struct CK_EDDSA_PARAMS {
    CK_BBOOL phFlag;
    CK_ULONG ulContextDataLen;
    CK_BYTE_PTR pContextData;
} CK_EDDSA_PARAMS;
#define CKM_EC_EDWARDS_KEY_PAIR_GEN 0x1055UL
#define CKM_EDDSA 0x1057UL
#define CKM_VENDOR_DEFINED 0x80000000UL

typedef struct CK_MECHANISM {
    CK_MECHANISM_TYPE mechanism;
    CK_VOID_PTR pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;
typedef CK_MECHANISM CK_PTR CK_MECHANISM_PTR;

typedef struct CK_MECHANISM_INFO {
    CK_ULONG ulMinKeySize;
    CK_ULONG ulMaxKeySize;
    CK_FLAGS flags;
} CK_MECHANISM_INFO;
typedef CK_MECHANISM_INFO CK_PTR CK_MECHANISM_INFO_PTR;

#define CKF_HW 0x00000001UL
#define CKF_SIGN 0x00000800UL
#define CKF_VERIFY 0x00002000UL
#define CKF_EC_F_P 0x00100000UL
#define CKF_EC_UNCOMPRESS 0x01000000UL

/* PKCS#11 3.2 post-quantum parameter sets and hedging (DESIGN §8). */
typedef CK_ULONG CK_ML_DSA_PARAMETER_SET_TYPE;
#define CKP_ML_DSA_44 0x1UL
#define CKP_ML_DSA_65 0x2UL
#define CKP_ML_DSA_87 0x3UL
typedef CK_ULONG CK_ML_KEM_PARAMETER_SET_TYPE;
#define CKP_ML_KEM_512 0x1UL
#define CKP_ML_KEM_768 0x2UL
#define CKP_ML_KEM_1024 0x3UL
typedef CK_ULONG CK_HEDGE_TYPE;
#define CKH_HEDGE_PREFERRED 0x0UL
#define CKH_HEDGE_REQUIRED 0x1UL
#define CKH_DETERMINISTIC_REQUIRED 0x2UL
typedef struct CK_SIGN_ADDITIONAL_CONTEXT {
    CK_HEDGE_TYPE hedgeVariant;
    CK_BYTE_PTR pContext;
    CK_ULONG ulContextLen;
} CK_SIGN_ADDITIONAL_CONTEXT;

/*
 * pqhsm vendor-defined values (pkcs11_shim/README.md, "The pqhsm extension").  They are
 * meaningful only on connections that negotiated the extension (libpqhsm-pkcs11.so).
 *
 * CKM_PQHSM_DUAL       dual (OR-mode) signature: the PQDS envelope of docs/signatures.md
 *                      (classical part over M, ML-DSA-87 part bound to the dual key).
 * CKM_PQHSM_COMPOSITE  composite signature, draft-ietf-lamps-pq-composite-sigs-19
 *                      (mldsaSig || tradSig); the algorithm is the key's parameter set.
 * Both take an optional CK_SIGN_ADDITIONAL_CONTEXT (hedge preferred/required only;
 * context at most 178 bytes for dual, 255 for composite) and sign the whole message,
 * single-part or multi-part.
 * CKK_PQHSM_DUAL / CKK_PQHSM_COMPOSITE: the key types of the objects these sign with;
 * they share the key's CKA_ID.  Public objects: CKA_VALUE is the ML-DSA-87 public key
 * (dual) or mldsaPK || tradPK (composite); CKA_PUBLIC_KEY_INFO is the classical SPKI
 * (dual) or the composite SPKI (composite).  Composite objects carry CKA_PARAMETER_SET
 * = CKP_PQHSM_MLDSA87_ECDSA_P384_SHA512 or CKP_PQHSM_MLDSA87_ED448_SHAKE256.
 */
#define CKK_PQHSM_DUAL (CKK_VENDOR_DEFINED | 0x1UL)
#define CKK_PQHSM_COMPOSITE (CKK_VENDOR_DEFINED | 0x2UL)
#define CKM_PQHSM_DUAL (CKM_VENDOR_DEFINED | 0x1UL)
#define CKM_PQHSM_COMPOSITE (CKM_VENDOR_DEFINED | 0x2UL)
#define CKP_VENDOR_DEFINED 0x80000000UL
#define CKP_PQHSM_MLDSA87_ECDSA_P384_SHA512 (CKP_VENDOR_DEFINED | 0x1UL)
#define CKP_PQHSM_MLDSA87_ED448_SHAKE256 (CKP_VENDOR_DEFINED | 0x2UL)

typedef CK_ULONG CK_RV;
#define CKR_OK 0x000UL
#define CKR_CANCEL 0x001UL
#define CKR_HOST_MEMORY 0x002UL
#define CKR_SLOT_ID_INVALID 0x003UL
#define CKR_GENERAL_ERROR 0x005UL
#define CKR_FUNCTION_FAILED 0x006UL
#define CKR_ARGUMENTS_BAD 0x007UL
#define CKR_NEED_TO_CREATE_THREADS 0x009UL
#define CKR_CANT_LOCK 0x00aUL
#define CKR_ATTRIBUTE_SENSITIVE 0x011UL
#define CKR_ATTRIBUTE_TYPE_INVALID 0x012UL
#define CKR_ATTRIBUTE_VALUE_INVALID 0x013UL
#define CKR_DATA_LEN_RANGE 0x021UL
#define CKR_DEVICE_ERROR 0x030UL
#define CKR_FUNCTION_NOT_SUPPORTED 0x054UL
#define CKR_MECHANISM_INVALID 0x070UL
#define CKR_MECHANISM_PARAM_INVALID 0x071UL
#define CKR_KEY_TYPE_INCONSISTENT 0x063UL
#define CKR_OPERATION_ACTIVE 0x090UL
#define CKR_OPERATION_NOT_INITIALIZED 0x091UL
#define CKR_PIN_INCORRECT 0x0a0UL
#define CKR_PIN_LOCKED 0x0a4UL
#define CKR_SESSION_HANDLE_INVALID 0x0b3UL
#define CKR_SIGNATURE_INVALID 0x0c0UL
#define CKR_SIGNATURE_LEN_RANGE 0x0c1UL
#define CKR_BUFFER_TOO_SMALL 0x150UL
#define CKR_CRYPTOKI_NOT_INITIALIZED 0x190UL
#define CKR_CRYPTOKI_ALREADY_INITIALIZED 0x191UL
#define CKR_VENDOR_DEFINED 0x80000000UL

typedef CK_RV (CK_PTR CK_NOTIFY)(CK_SESSION_HANDLE hSession, CK_NOTIFICATION event,
                                 CK_VOID_PTR pApplication);
typedef CK_RV (CK_PTR CK_CREATEMUTEX)(CK_VOID_PTR_PTR ppMutex);
typedef CK_RV (CK_PTR CK_DESTROYMUTEX)(CK_VOID_PTR pMutex);
typedef CK_RV (CK_PTR CK_LOCKMUTEX)(CK_VOID_PTR pMutex);
typedef CK_RV (CK_PTR CK_UNLOCKMUTEX)(CK_VOID_PTR pMutex);

typedef struct CK_C_INITIALIZE_ARGS {
    CK_CREATEMUTEX CreateMutex;
    CK_DESTROYMUTEX DestroyMutex;
    CK_LOCKMUTEX LockMutex;
    CK_UNLOCKMUTEX UnlockMutex;
    CK_FLAGS flags;
    CK_VOID_PTR pReserved;
} CK_C_INITIALIZE_ARGS;
typedef CK_C_INITIALIZE_ARGS CK_PTR CK_C_INITIALIZE_ARGS_PTR;

#define CKF_LIBRARY_CANT_CREATE_OS_THREADS 0x00000001UL
#define CKF_OS_LOCKING_OK 0x00000002UL

struct CK_FUNCTION_LIST;
typedef struct CK_FUNCTION_LIST CK_FUNCTION_LIST;
struct CK_FUNCTION_LIST_3_0;
typedef struct CK_FUNCTION_LIST_3_0 CK_FUNCTION_LIST_3_0;
typedef CK_FUNCTION_LIST_3_0 CK_PTR CK_FUNCTION_LIST_3_0_PTR;
typedef CK_FUNCTION_LIST_3_0_PTR CK_PTR CK_FUNCTION_LIST_3_0_PTR_PTR;

/* PKCS#11 3.0 interface discovery. */
typedef struct CK_INTERFACE {
    CK_CHAR *pInterfaceName;
    CK_VOID_PTR pFunctionList;
    CK_FLAGS flags;
} CK_INTERFACE;
typedef CK_INTERFACE CK_PTR CK_INTERFACE_PTR;
typedef CK_INTERFACE_PTR CK_PTR CK_INTERFACE_PTR_PTR;
#define CKF_INTERFACE_FORK_SAFE 0x00000001UL
#define CKF_END_OF_MESSAGE 0x00000001UL
typedef CK_FUNCTION_LIST CK_PTR CK_FUNCTION_LIST_PTR;
typedef CK_FUNCTION_LIST_PTR CK_PTR CK_FUNCTION_LIST_PTR_PTR;

/*
 * The 68 v2.40 functions in CK_FUNCTION_LIST order: X(name, (parameters)).
 */
#define CK_PKCS11_FUNCTIONS(X) \
    X(C_Initialize, (CK_VOID_PTR pInitArgs)) \
    X(C_Finalize, (CK_VOID_PTR pReserved)) \
    X(C_GetInfo, (CK_INFO_PTR pInfo)) \
    X(C_GetFunctionList, (CK_FUNCTION_LIST_PTR_PTR ppFunctionList)) \
    X(C_GetSlotList, (CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount)) \
    X(C_GetSlotInfo, (CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)) \
    X(C_GetTokenInfo, (CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)) \
    X(C_GetMechanismList, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, \
                           CK_ULONG_PTR pulCount)) \
    X(C_GetMechanismInfo, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, \
                           CK_MECHANISM_INFO_PTR pInfo)) \
    X(C_InitToken, (CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, \
                    CK_UTF8CHAR_PTR pLabel)) \
    X(C_InitPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen)) \
    X(C_SetPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen, \
                 CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen)) \
    X(C_OpenSession, (CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, \
                      CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession)) \
    X(C_CloseSession, (CK_SESSION_HANDLE hSession)) \
    X(C_CloseAllSessions, (CK_SLOT_ID slotID)) \
    X(C_GetSessionInfo, (CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo)) \
    X(C_GetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
                            CK_ULONG_PTR pulOperationStateLen)) \
    X(C_SetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, \
                            CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey, \
                            CK_OBJECT_HANDLE hAuthenticationKey)) \
    X(C_Login, (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
                CK_ULONG ulPinLen)) \
    X(C_Logout, (CK_SESSION_HANDLE hSession)) \
    X(C_CreateObject, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, \
                       CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject)) \
    X(C_CopyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
                     CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, \
                     CK_OBJECT_HANDLE_PTR phNewObject)) \
    X(C_DestroyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)) \
    X(C_GetObjectSize, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
                        CK_ULONG_PTR pulSize)) \
    X(C_GetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
                            CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)) \
    X(C_SetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, \
                            CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)) \
    X(C_FindObjectsInit, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, \
                          CK_ULONG ulCount)) \
    X(C_FindObjects, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, \
                      CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount)) \
    X(C_FindObjectsFinal, (CK_SESSION_HANDLE hSession)) \
    X(C_EncryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                      CK_OBJECT_HANDLE hKey)) \
    X(C_Encrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                  CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen)) \
    X(C_EncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, \
                        CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen)) \
    X(C_EncryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart, \
                       CK_ULONG_PTR pulLastEncryptedPartLen)) \
    X(C_DecryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                      CK_OBJECT_HANDLE hKey)) \
    X(C_Decrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, \
                  CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen)) \
    X(C_DecryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
                        CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, \
                        CK_ULONG_PTR pulPartLen)) \
    X(C_DecryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, \
                       CK_ULONG_PTR pulLastPartLen)) \
    X(C_DigestInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism)) \
    X(C_Digest, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                 CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen)) \
    X(C_DigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)) \
    X(C_DigestKey, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey)) \
    X(C_DigestFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, \
                      CK_ULONG_PTR pulDigestLen)) \
    X(C_SignInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                   CK_OBJECT_HANDLE hKey)) \
    X(C_Sign, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
               CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
    X(C_SignUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)) \
    X(C_SignFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
                    CK_ULONG_PTR pulSignatureLen)) \
    X(C_SignRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                          CK_OBJECT_HANDLE hKey)) \
    X(C_SignRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                      CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
    X(C_VerifyInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                     CK_OBJECT_HANDLE hKey)) \
    X(C_Verify, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                 CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)) \
    X(C_VerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)) \
    X(C_VerifyFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
                      CK_ULONG ulSignatureLen)) \
    X(C_VerifyRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                            CK_OBJECT_HANDLE hKey)) \
    X(C_VerifyRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, \
                        CK_ULONG ulSignatureLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen)) \
    X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, \
                              CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, \
                              CK_ULONG_PTR pulEncryptedPartLen)) \
    X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
                              CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, \
                              CK_ULONG_PTR pulPartLen)) \
    X(C_SignEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, \
                            CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, \
                            CK_ULONG_PTR pulEncryptedPartLen)) \
    X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, \
                              CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, \
                              CK_ULONG_PTR pulPartLen)) \
    X(C_GenerateKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                      CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, \
                      CK_OBJECT_HANDLE_PTR phKey)) \
    X(C_GenerateKeyPair, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                          CK_ATTRIBUTE_PTR pPublicKeyTemplate, \
                          CK_ULONG ulPublicKeyAttributeCount, \
                          CK_ATTRIBUTE_PTR pPrivateKeyTemplate, \
                          CK_ULONG ulPrivateKeyAttributeCount, \
                          CK_OBJECT_HANDLE_PTR phPublicKey, \
                          CK_OBJECT_HANDLE_PTR phPrivateKey)) \
    X(C_WrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                  CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey, \
                  CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen)) \
    X(C_UnwrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                    CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey, \
                    CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate, \
                    CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)) \
    X(C_DeriveKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                    CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate, \
                    CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey)) \
    X(C_SeedRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen)) \
    X(C_GenerateRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, \
                         CK_ULONG ulRandomLen)) \
    X(C_GetFunctionStatus, (CK_SESSION_HANDLE hSession)) \
    X(C_CancelFunction, (CK_SESSION_HANDLE hSession)) \
    X(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved))

/*
 * The 24 functions PKCS#11 3.0 appends to the list (CK_FUNCTION_LIST_3_0 order).  Only
 * C_GetInterfaceList and C_GetInterface are library entry points; the rest are reached
 * through the 3.0 function list.
 */
#define CK_PKCS11_3_0_FUNCTIONS(X) \
    X(C_GetInterfaceList, (CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount)) \
    X(C_GetInterface, (CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion, \
                       CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags)) \
    X(C_LoginUser, (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, \
                    CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pUsername, CK_ULONG ulUsernameLen)) \
    X(C_SessionCancel, (CK_SESSION_HANDLE hSession, CK_FLAGS flags)) \
    X(C_MessageEncryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                             CK_OBJECT_HANDLE hKey)) \
    X(C_EncryptMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                         CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, \
                         CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pPlaintext, \
                         CK_ULONG ulPlaintextLen, CK_BYTE_PTR pCiphertext, \
                         CK_ULONG_PTR pulCiphertextLen)) \
    X(C_EncryptMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                              CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, \
                              CK_ULONG ulAssociatedDataLen)) \
    X(C_EncryptMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                             CK_ULONG ulParameterLen, CK_BYTE_PTR pPlaintextPart, \
                             CK_ULONG ulPlaintextPartLen, CK_BYTE_PTR pCiphertextPart, \
                             CK_ULONG_PTR pulCiphertextPartLen, CK_FLAGS flags)) \
    X(C_MessageEncryptFinal, (CK_SESSION_HANDLE hSession)) \
    X(C_MessageDecryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                             CK_OBJECT_HANDLE hKey)) \
    X(C_DecryptMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                         CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, \
                         CK_ULONG ulAssociatedDataLen, CK_BYTE_PTR pCiphertext, \
                         CK_ULONG ulCiphertextLen, CK_BYTE_PTR pPlaintext, \
                         CK_ULONG_PTR pulPlaintextLen)) \
    X(C_DecryptMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                              CK_ULONG ulParameterLen, CK_BYTE_PTR pAssociatedData, \
                              CK_ULONG ulAssociatedDataLen)) \
    X(C_DecryptMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                             CK_ULONG ulParameterLen, CK_BYTE_PTR pCiphertextPart, \
                             CK_ULONG ulCiphertextPartLen, CK_BYTE_PTR pPlaintextPart, \
                             CK_ULONG_PTR pulPlaintextPartLen, CK_FLAGS flags)) \
    X(C_MessageDecryptFinal, (CK_SESSION_HANDLE hSession)) \
    X(C_MessageSignInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                          CK_OBJECT_HANDLE hKey)) \
    X(C_SignMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                      CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                      CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
    X(C_SignMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                           CK_ULONG ulParameterLen)) \
    X(C_SignMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                          CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                          CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)) \
    X(C_MessageSignFinal, (CK_SESSION_HANDLE hSession)) \
    X(C_MessageVerifyInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, \
                            CK_OBJECT_HANDLE hKey)) \
    X(C_VerifyMessage, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                        CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                        CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)) \
    X(C_VerifyMessageBegin, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                             CK_ULONG ulParameterLen)) \
    X(C_VerifyMessageNext, (CK_SESSION_HANDLE hSession, CK_VOID_PTR pParameter, \
                            CK_ULONG ulParameterLen, CK_BYTE_PTR pData, CK_ULONG ulDataLen, \
                            CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen)) \
    X(C_MessageVerifyFinal, (CK_SESSION_HANDLE hSession))

#ifndef CK_EXPORT
#define CK_EXPORT
#endif
#define CK_PKCS11_DECLARE_(name, params) extern CK_EXPORT CK_RV name params;
CK_PKCS11_FUNCTIONS(CK_PKCS11_DECLARE_)
#undef CK_PKCS11_DECLARE_

extern CK_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList,
                                          CK_ULONG_PTR pulCount);
extern CK_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                                      CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags);

#define CK_PKCS11_TYPEDEF_(name, params) typedef CK_RV (CK_PTR CK_##name) params;
CK_PKCS11_FUNCTIONS(CK_PKCS11_TYPEDEF_)
CK_PKCS11_3_0_FUNCTIONS(CK_PKCS11_TYPEDEF_)
#undef CK_PKCS11_TYPEDEF_

struct CK_FUNCTION_LIST {
    CK_VERSION version;
#define CK_PKCS11_MEMBER_(name, params) CK_##name name;
    CK_PKCS11_FUNCTIONS(CK_PKCS11_MEMBER_)
#undef CK_PKCS11_MEMBER_
};

struct CK_FUNCTION_LIST_3_0 {
    CK_VERSION version;
#define CK_PKCS11_MEMBER_(name, params) CK_##name name;
    CK_PKCS11_FUNCTIONS(CK_PKCS11_MEMBER_)
    CK_PKCS11_3_0_FUNCTIONS(CK_PKCS11_MEMBER_)
#undef CK_PKCS11_MEMBER_
};

#ifdef __cplusplus
}
#endif

#endif /* PQHSM_PKCS11_H */
