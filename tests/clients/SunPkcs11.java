// Drives pkcs11-ha through Java's SunPKCS11 provider for tests/clients.rs:
// sign and verify with EC and RSA keys generated on the token, and with
// "aes" also AES-GCM. Any failure throws, so the JVM exits non-zero.
//
// Usage: java SunPkcs11.java CONFIG PIN [aes]

import java.nio.charset.StandardCharsets;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.Provider;
import java.security.SecureRandom;
import java.security.Security;
import java.security.Signature;
import java.security.spec.ECGenParameterSpec;
import java.util.Arrays;
import javax.crypto.AEADBadTagException;
import javax.crypto.Cipher;
import javax.crypto.KeyGenerator;
import javax.crypto.SecretKey;
import javax.crypto.spec.GCMParameterSpec;

public class SunPkcs11 {
    public static void main(String[] args) throws Exception {
        Provider provider = Security.getProvider("SunPKCS11").configure(args[0]);
        KeyStore keyStore = KeyStore.getInstance("PKCS11", provider);
        keyStore.load(null, args[1].toCharArray());
        byte[] message = "pkcs11-ha through SunPKCS11".getBytes(StandardCharsets.UTF_8);
        byte[] other = "another message".getBytes(StandardCharsets.UTF_8);

        String[][] kinds = {{"EC", "SHA256withECDSA"}, {"RSA", "SHA256withRSA"}};
        for (String[] kind : kinds) {
            KeyPairGenerator generator = KeyPairGenerator.getInstance(kind[0], provider);
            if (kind[0].equals("EC")) {
                generator.initialize(new ECGenParameterSpec("secp256r1"));
            } else {
                generator.initialize(2048);
            }
            KeyPair pair = generator.generateKeyPair();
            Signature signer = Signature.getInstance(kind[1], provider);
            signer.initSign(pair.getPrivate());
            signer.update(message);
            byte[] signature = signer.sign();
            Signature verifier = Signature.getInstance(kind[1], provider);
            verifier.initVerify(pair.getPublic());
            verifier.update(message);
            if (!verifier.verify(signature)) {
                throw new AssertionError(kind[1] + ": the signature does not verify");
            }
            verifier.initVerify(pair.getPublic());
            verifier.update(other);
            if (verifier.verify(signature)) {
                throw new AssertionError(kind[1] + ": another message verifies");
            }
            System.out.println(kind[1] + " signed and verified");
        }

        if (args.length > 2 && args[2].equals("aes")) {
            KeyGenerator generator = KeyGenerator.getInstance("AES", provider);
            generator.init(256);
            SecretKey key = generator.generateKey();
            byte[] iv = new byte[12];
            new SecureRandom().nextBytes(iv);
            byte[] aad = "header".getBytes(StandardCharsets.UTF_8);
            Cipher encrypt = Cipher.getInstance("AES/GCM/NoPadding", provider);
            encrypt.init(Cipher.ENCRYPT_MODE, key, new GCMParameterSpec(128, iv));
            encrypt.updateAAD(aad);
            byte[] sealed = encrypt.doFinal(message);
            Cipher decrypt = Cipher.getInstance("AES/GCM/NoPadding", provider);
            decrypt.init(Cipher.DECRYPT_MODE, key, new GCMParameterSpec(128, iv));
            decrypt.updateAAD(aad);
            if (!Arrays.equals(decrypt.doFinal(sealed), message)) {
                throw new AssertionError("AES-GCM: the plaintext came back different");
            }
            sealed[0] ^= 1;
            decrypt.init(Cipher.DECRYPT_MODE, key, new GCMParameterSpec(128, iv));
            decrypt.updateAAD(aad);
            try {
                decrypt.doFinal(sealed);
                throw new AssertionError("AES-GCM: a changed ciphertext decrypts");
            } catch (AEADBadTagException expected) {
                System.out.println("AES-GCM encrypted, decrypted and refused a changed ciphertext");
            }
        }
    }
}
