/*
 * One application process on the virtual slot 0 (group VirtualToken00),
 * logged in as the user with the PIN in $RECONCILE_USER_PIN, for
 * tests/reconcile.rs.
 *
 * usage: reconcile_user LIBRARY make LABEL    a data object LABEL and an AES key LABEL-key
 *        reconcile_user LIBRARY many PREFIX N data objects PREFIX-0 .. PREFIX-(N-1)
 *        reconcile_user LIBRARY destroy LABEL destroys the objects labelled LABEL
 *        reconcile_user LIBRARY stay          prints "ready", then waits for the end of stdin
 *
 * Prints "ok" and exits 0 when every call answered CKR_OK; else prints the
 * call and its return value and exits 1.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef unsigned char CK_BBOOL;
typedef struct {
    CK_ULONG type;
    void *value;
    CK_ULONG length;
} attribute;
typedef struct {
    CK_ULONG mechanism;
    void *parameter;
    CK_ULONG length;
} mechanism;

typedef CK_RV (*initialize_fn)(void *);
typedef CK_RV (*finalize_fn)(void *);
typedef CK_RV (*open_session_fn)(CK_ULONG, CK_ULONG, void *, void *, CK_ULONG *);
typedef CK_RV (*login_fn)(CK_ULONG, CK_ULONG, unsigned char *, CK_ULONG);
typedef CK_RV (*create_fn)(CK_ULONG, attribute *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*generate_fn)(CK_ULONG, mechanism *, attribute *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*find_init_fn)(CK_ULONG, attribute *, CK_ULONG);
typedef CK_RV (*find_fn)(CK_ULONG, CK_ULONG *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*find_final_fn)(CK_ULONG);
typedef CK_RV (*destroy_fn)(CK_ULONG, CK_ULONG);

#define CKF_RW_SESSION 2UL
#define CKF_SERIAL_SESSION 4UL
#define CKU_USER 1UL
#define CKA_CLASS 0x0UL
#define CKA_TOKEN 0x1UL
#define CKA_PRIVATE 0x2UL
#define CKA_LABEL 0x3UL
#define CKA_VALUE 0x11UL
#define CKA_ENCRYPT 0x104UL
#define CKA_VALUE_LEN 0x161UL
#define CKO_DATA 0UL
#define CKM_AES_KEY_GEN 0x1080UL

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

static CK_ULONG session;

static void make_data(const char *label) {
    CK_ULONG class = CKO_DATA;
    CK_BBOOL yes = 1, no = 0;
    attribute template[] = {
        {CKA_CLASS, &class, sizeof class},
        {CKA_TOKEN, &yes, 1},
        {CKA_PRIVATE, &no, 1},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_VALUE, (void *)label, strlen(label)},
    };
    CK_ULONG object;
    check("C_CreateObject", ((create_fn)entry("C_CreateObject"))(session, template, 5, &object));
}

static void make_key(const char *label) {
    CK_ULONG length = 32;
    CK_BBOOL yes = 1;
    attribute template[] = {
        {CKA_TOKEN, &yes, 1},
        {CKA_PRIVATE, &yes, 1},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_ENCRYPT, &yes, 1},
        {CKA_VALUE_LEN, &length, sizeof length},
    };
    mechanism generate = {CKM_AES_KEY_GEN, NULL, 0};
    CK_ULONG key;
    check("C_GenerateKey",
          ((generate_fn)entry("C_GenerateKey"))(session, &generate, template, 5, &key));
}

static void destroy(const char *label) {
    attribute template[] = {{CKA_LABEL, (void *)label, strlen(label)}};
    CK_ULONG found[16], count = 0;
    check("C_FindObjectsInit", ((find_init_fn)entry("C_FindObjectsInit"))(session, template, 1));
    check("C_FindObjects", ((find_fn)entry("C_FindObjects"))(session, found, 16, &count));
    check("C_FindObjectsFinal", ((find_final_fn)entry("C_FindObjectsFinal"))(session));
    if (count == 0) {
        printf("no object labelled %s\n", label);
        exit(1);
    }
    for (CK_ULONG i = 0; i < count; i++)
        check("C_DestroyObject", ((destroy_fn)entry("C_DestroyObject"))(session, found[i]));
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s LIBRARY make|many|destroy|stay ...\n", argv[0]);
        return 2;
    }
    library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    check("C_Initialize", ((initialize_fn)entry("C_Initialize"))(NULL));
    check("C_OpenSession", ((open_session_fn)entry("C_OpenSession"))(
                               0, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session));
    /* One C_Login, as an ordinary application makes it: SoftHSM's
     * CKR_GENERAL_ERROR while other processes log in is pkcs11-ha's to
     * retry (group::log_in_member). */
    const char *pin = getenv("RECONCILE_USER_PIN");
    if (!pin) {
        fprintf(stderr, "RECONCILE_USER_PIN is not set\n");
        return 1;
    }
    check("C_Login", ((login_fn)entry("C_Login"))(session, CKU_USER, (unsigned char *)pin,
                                                  strlen(pin)));
    const char *command = argv[2];
    if (strcmp(command, "make") == 0 && argc == 4) {
        char key_label[256];
        snprintf(key_label, sizeof key_label, "%s-key", argv[3]);
        make_data(argv[3]);
        make_key(key_label);
    } else if (strcmp(command, "many") == 0 && argc == 5) {
        int n = atoi(argv[4]);
        for (int i = 0; i < n; i++) {
            char label[256];
            snprintf(label, sizeof label, "%s-%d", argv[3], i);
            make_data(label);
        }
    } else if (strcmp(command, "destroy") == 0 && argc == 4) {
        destroy(argv[3]);
    } else if (strcmp(command, "stay") == 0 && argc == 3) {
        printf("ready\n");
        fflush(stdout);
        while (getchar() != EOF) {
        }
    } else {
        fprintf(stderr, "unknown command %s\n", command);
        return 2;
    }
    check("C_Finalize", ((finalize_fn)entry("C_Finalize"))(NULL));
    printf("ok\n");
    fflush(stdout);
    return 0;
}
