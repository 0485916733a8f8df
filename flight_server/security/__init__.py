"""Security: who is calling (`tokens`, `middleware`), what they may do (`policy`, `grants`,
`users`), narrowed tokens for delegation (`delegation`), sealed tickets (`tickets`), the audit
log (`audit`), the server's keys and certificates (`keys`, `certs`), validation of Arrow data
clients send (`client_data`), and the assembly of all of it from the settings (`assembly`)."""
