<?php
// Verifies a vendgate webhook: php verify_webhook.php APPSECRET "$SIGNATURE" < body.json
// (exit status 0: genuine and fresh). In a web app the body is
// file_get_contents('php://input') and the header $_SERVER['HTTP_VENDGATE_SIGNATURE'].

// Checks a Vendgate-Signature header ("t=<unix>,v1=<hex>") against the raw
// body bytes exactly as received, and rejects a t older (or newer) than
// $tolerance seconds so that a captured request cannot be replayed.
function vendgate_verify(string $appSecret, string $signature, string $body, int $tolerance = 300): bool
{
    $fields = [];
    foreach (explode(',', $signature) as $part) {
        $kv = explode('=', $part, 2);
        if (count($kv) === 2) {
            $fields[$kv[0]] = $kv[1];
        }
    }
    $t = $fields['t'] ?? '';
    $v1 = $fields['v1'] ?? '';
    if ($t === '' || strspn($t, '0123456789') !== strlen($t) || abs(time() - (int) $t) > $tolerance) {
        return false; // missing or stale timestamp
    }
    $expected = hash_hmac('sha256', $t . '.' . $body, $appSecret);
    return hash_equals($expected, $v1); // constant time
}

if (PHP_SAPI === 'cli' && realpath($argv[0]) === __FILE__) {
    $ok = $argc === 3 && vendgate_verify($argv[1], $argv[2], file_get_contents('php://stdin'));
    fwrite($ok ? STDOUT : STDERR, $ok ? "verified\n" : "rejected\n");
    exit($ok ? 0 : 1);
}
