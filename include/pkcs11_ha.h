/*
 * pkcs11-ha extension API: the state of HA groups, for applications.
 *
 * Include after your PKCS#11 header (pkcs11.h / cryptoki.h), which defines
 * CK_CHAR, CK_ULONG, CK_RV and CK_SLOT_ID. The functions are exported by
 * libpkcs11_ha.so but are not in the PKCS#11 function table: find them
 * with dlsym(). Both return CKR_SLOT_ID_INVALID for a slot that is not a
 * virtual (HA group) slot.
 *
 * Keep in sync with src/state_api.rs: build.rs refuses to build when a
 * constant, struct field or function here differs from the Rust one, and
 * tests/state_api.rs compiles this header and checks every size and
 * offset against the library's.
 */
#ifndef PKCS11_HA_H
#define PKCS11_HA_H

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Luna-compatible: CA_GetHAState ---------------------------------- */

#define CK_HA_MAX_MEMBERS 32
/* CK_TOKEN_SERIAL_NUMBER_SIZE + 4, as in Luna's header: serials are
 * NUL-terminated strings. */
#define CK_HA_SERIAL_SIZE 20

typedef struct CK_HA_MEMBER {
    CK_CHAR memberSerial[CK_HA_SERIAL_SIZE];
    CK_RV memberStatus; /* CKR_OK while serving, else the fault that took it out */
} CK_HA_MEMBER;

typedef struct CK_HA_STATUS {
    CK_CHAR groupSerial[CK_HA_SERIAL_SIZE];
    CK_HA_MEMBER memberList[CK_HA_MAX_MEMBERS];
    CK_ULONG listSize;
} CK_HA_STATUS;

typedef CK_HA_MEMBER *CK_HA_MEMBER_PTR;
typedef CK_HA_STATUS *CK_HA_STATE_PTR;

CK_RV CA_GetHAState(CK_SLOT_ID slotId, CK_HA_STATE_PTR pState);

/* ---- pkcs11-ha: PKCS11HA_GetGroupStatus ------------------------------- */

#define PKCS11HA_LABEL_SIZE 33

#define PKCS11HA_ROLE_ACTIVE 0UL
#define PKCS11HA_ROLE_STANDBY 1UL

#define PKCS11HA_STATE_UP 0UL
#define PKCS11HA_STATE_DOWN 1UL
#define PKCS11HA_STATE_RECOVERING 2UL

typedef struct PKCS11HA_MEMBER_STATUS {
    CK_CHAR serial[CK_HA_SERIAL_SIZE];
    CK_ULONG role;                /* PKCS11HA_ROLE_* */
    CK_ULONG state;               /* PKCS11HA_STATE_* */
    CK_ULONG consecutiveFailures; /* faults since it last served */
    CK_ULONG callsServed;         /* member calls completed */
    CK_ULONG callsInFlight;       /* member calls under way now */
    CK_RV lastFault;              /* CKR_OK if it never faulted */
    CK_ULONG msSinceStateChange;
    CK_ULONG pendingChanges;      /* objects it has yet to receive */
} PKCS11HA_MEMBER_STATUS;

typedef struct PKCS11HA_GROUP_STATUS {
    CK_CHAR label[PKCS11HA_LABEL_SIZE]; /* NUL-terminated */
    CK_CHAR serial[CK_HA_SERIAL_SIZE];  /* NUL-terminated */
    CK_SLOT_ID slotID;
    CK_ULONG memberCount;
    PKCS11HA_MEMBER_STATUS members[CK_HA_MAX_MEMBERS];
} PKCS11HA_GROUP_STATUS;

CK_RV PKCS11HA_GetGroupStatus(CK_SLOT_ID slotID, PKCS11HA_GROUP_STATUS *pStatus);

#ifdef __cplusplus
}
#endif

#endif /* PKCS11_HA_H */
