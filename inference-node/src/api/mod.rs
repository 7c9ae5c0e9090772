//! The node's front: the HTTP server (`server`), the OpenAI request and
//! response types with their validation (`openai`), and chat templates
//! (`chat`).

pub mod chat;
pub mod openai;
pub mod server;
