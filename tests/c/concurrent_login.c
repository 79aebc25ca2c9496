/*
 * One of several processes that log in to the same token at the same
 * moment, for tests/concurrent_login.rs: opens a session, prints "ready",
 * waits for a line on stdin (the start signal every process gets at once),
 * calls C_Login once as the user with PIN and prints
 * its answer. On pkcs11-ha it then prints each member's state as
 * PKCS11HA_GetGroupStatus reports it.
 *
 * usage: concurrent_login LIBRARY SLOT_ID PIN
 *
 * Output after "ready": "C_Login rv=0x..", then on pkcs11-ha one line
 * "member SERIAL state=S fault=0x.." per member; exits 0 unless a call
 * other than C_Login failed.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned char CK_CHAR;
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_RV (*C_Initialize_fn)(void *);
typedef CK_RV (*C_Finalize_fn)(void *);
typedef CK_RV (*C_OpenSession_fn)(CK_SLOT_ID, CK_ULONG, void *, void *, CK_ULONG *);
typedef CK_RV (*C_Login_fn)(CK_ULONG, CK_ULONG, unsigned char *, CK_ULONG);

#include "../../include/pkcs11_ha.h"

typedef CK_RV (*GetGroupStatus_fn)(CK_SLOT_ID, PKCS11HA_GROUP_STATUS *);

#define CKF_RW_SESSION 2UL
#define CKF_SERIAL_SESSION 4UL
#define CKU_USER 1UL

static void *library;

static void *entry(const char *name) {
    void *found = dlsym(library, name);
    if (!found) {
        fprintf(stderr, "dlsym %s: %s\n", name, dlerror());
        exit(1);
    }
    return found;
}

static void check(const char *call, CK_RV rv) {
    if (rv != 0) {
        printf("%s rv=0x%lx\n", call, rv);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s LIBRARY SLOT_ID PIN\n", argv[0]);
        return 2;
    }
    library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    CK_SLOT_ID slot = strtoul(argv[2], NULL, 10);
    char *pin = argv[3];
    check("C_Initialize", ((C_Initialize_fn)entry("C_Initialize"))(NULL));
    CK_ULONG session;
    check("C_OpenSession", ((C_OpenSession_fn)entry("C_OpenSession"))(
                               slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session));
    printf("ready\n");
    fflush(stdout);
    if (getchar() == EOF) {
        fprintf(stderr, "no start signal\n");
        return 1;
    }
    CK_RV login = ((C_Login_fn)entry("C_Login"))(session, CKU_USER, (unsigned char *)pin, strlen(pin));
    printf("C_Login rv=0x%lx\n", login);
    GetGroupStatus_fn get_group_status = (GetGroupStatus_fn)dlsym(library, "PKCS11HA_GetGroupStatus");
    if (get_group_status) {
        PKCS11HA_GROUP_STATUS status;
        check("PKCS11HA_GetGroupStatus", get_group_status(slot, &status));
        for (CK_ULONG i = 0; i < status.memberCount; i++)
            printf("member %s state=%lu fault=0x%lx\n", (char *)status.members[i].serial,
                   status.members[i].state, status.members[i].lastFault);
    }
    check("C_Finalize", ((C_Finalize_fn)entry("C_Finalize"))(NULL));
    return 0;
}
