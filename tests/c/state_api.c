/*
 * An application written against include/pkcs11_ha.h: loads the library,
 * logs the layout of the header's structs (so the test can compare it with
 * the library's), then reads both state calls for slot 0 and prints them.
 *
 * usage: state_api LIBRARY
 */
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>

/* What a PKCS#11 header provides, as the pkcs11_ha.h comment asks. */
typedef unsigned char CK_CHAR;
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_RV (*C_Initialize_fn)(void *);
typedef CK_RV (*C_Finalize_fn)(void *);

#include "../../include/pkcs11_ha.h"

typedef CK_RV (*CA_GetHAState_fn)(CK_SLOT_ID, CK_HA_STATE_PTR);
typedef CK_RV (*GetGroupStatus_fn)(CK_SLOT_ID, PKCS11HA_GROUP_STATUS *);

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s LIBRARY\n", argv[0]);
        return 2;
    }
    printf("layout CK_HA_MEMBER %zu %zu\n", sizeof(CK_HA_MEMBER), offsetof(CK_HA_MEMBER, memberStatus));
    printf("layout CK_HA_STATUS %zu %zu %zu\n", sizeof(CK_HA_STATUS), offsetof(CK_HA_STATUS, memberList),
           offsetof(CK_HA_STATUS, listSize));
    printf("layout PKCS11HA_MEMBER_STATUS %zu %zu %zu\n", sizeof(PKCS11HA_MEMBER_STATUS),
           offsetof(PKCS11HA_MEMBER_STATUS, role), offsetof(PKCS11HA_MEMBER_STATUS, pendingChanges));
    printf("layout PKCS11HA_GROUP_STATUS %zu %zu %zu %zu\n", sizeof(PKCS11HA_GROUP_STATUS),
           offsetof(PKCS11HA_GROUP_STATUS, serial), offsetof(PKCS11HA_GROUP_STATUS, slotID),
           offsetof(PKCS11HA_GROUP_STATUS, members));

    void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    C_Initialize_fn initialize = (C_Initialize_fn)dlsym(library, "C_Initialize");
    C_Finalize_fn finalize = (C_Finalize_fn)dlsym(library, "C_Finalize");
    CA_GetHAState_fn get_ha_state = (CA_GetHAState_fn)dlsym(library, "CA_GetHAState");
    GetGroupStatus_fn get_group_status = (GetGroupStatus_fn)dlsym(library, "PKCS11HA_GetGroupStatus");
    if (!initialize || !finalize || !get_ha_state || !get_group_status) {
        fprintf(stderr, "missing export\n");
        return 1;
    }
    CK_RV rv = initialize(NULL);
    if (rv != 0) {
        fprintf(stderr, "C_Initialize: 0x%lx\n", rv);
        return 1;
    }

    CK_HA_STATUS state;
    rv = get_ha_state(0, &state);
    printf("CA_GetHAState rv=0x%lx group=%s members=%lu\n", rv, (char *)state.groupSerial, state.listSize);
    for (CK_ULONG i = 0; rv == 0 && i < state.listSize; i++) {
        printf("  member %s status=0x%lx\n", (char *)state.memberList[i].memberSerial,
               state.memberList[i].memberStatus);
    }
    printf("CA_GetHAState(NULL) rv=0x%lx\n", get_ha_state(0, NULL));

    PKCS11HA_GROUP_STATUS status;
    rv = get_group_status(0, &status);
    printf("PKCS11HA_GetGroupStatus rv=0x%lx label=%s serial=%s slot=%lu members=%lu\n", rv,
           (char *)status.label, (char *)status.serial, status.slotID, status.memberCount);
    for (CK_ULONG i = 0; rv == 0 && i < status.memberCount; i++) {
        PKCS11HA_MEMBER_STATUS *m = &status.members[i];
        printf("  member %s role=%lu state=%lu failures=%lu served=%lu inflight=%lu fault=0x%lx pending=%lu\n",
               (char *)m->serial, m->role, m->state, m->consecutiveFailures, m->callsServed,
               m->callsInFlight, m->lastFault, m->pendingChanges);
    }
    finalize(NULL);
    return 0;
}
