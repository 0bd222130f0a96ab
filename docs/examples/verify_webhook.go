// Verifies a vendgate webhook: go run verify_webhook.go APPSECRET "$SIGNATURE" < body.json
// (exit status 0: genuine and fresh). Standard library only.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// Verify checks a Vendgate-Signature header ("t=<unix>,v1=<hex>") against
// the raw body bytes exactly as received, and rejects a t older (or
// newer) than tolerance so that a captured request cannot be replayed.
func Verify(appSecret, signature string, body []byte, tolerance time.Duration) bool {
	var t, v1 string
	for _, part := range strings.Split(signature, ",") {
		if k, v, ok := strings.Cut(part, "="); ok && k == "t" {
			t = v
		} else if ok && k == "v1" {
			v1 = v
		}
	}
	ts, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return false // missing timestamp
	}
	if age := time.Since(time.Unix(ts, 0)); age > tolerance || age < -tolerance {
		return false // stale timestamp
	}
	got, err := hex.DecodeString(v1)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, []byte(appSecret))
	mac.Write([]byte(t + "."))
	mac.Write(body)
	return hmac.Equal(mac.Sum(nil), got) // constant time
}

func main() {
	body, err := io.ReadAll(os.Stdin)
	if len(os.Args) != 3 || err != nil || !Verify(os.Args[1], os.Args[2], body, 5*time.Minute) {
		os.Stderr.WriteString("rejected\n")
		os.Exit(1)
	}
	os.Stdout.WriteString("verified\n")
}
