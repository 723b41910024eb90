//! A faithful Gemini API simulator (filled in by the simulator work).
