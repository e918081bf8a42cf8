"""The Gradio app's tabs and plotly charts. Importing this package does not import gradio."""
